"""Run the esmpp command line from a checkout: `python cli.py --help`."""

from esmpp.cli import run

if __name__ == "__main__":
    run()
