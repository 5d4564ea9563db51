"""Quickstart: build an ESM++ artifact from the offline zoo and predict without knowing the task.

python examples/quickstart.py            # uses the tiny zoo (about a minute the first time)
python examples/quickstart.py mini       # the benchmark zoo (~15 minutes the first time)
"""

import sys
import tempfile
from pathlib import Path

from esmpp.artifact import save_artifact
from esmpp.build import BuildOptions, build_artifact
from esmpp.runtime.predictor import Predictor
from esmpp.sources import zoo_sources
from esmpp.zoo import build_zoo

preset = sys.argv[1] if len(sys.argv) > 1 else "tiny"
zoo = build_zoo(preset)  # cached after the first run

# 1. Load the pretrained encoder and describe each task: a lazy checkpoint loader, proxy images,
#    a head and validation data for choosing α.
pretrained, tasks = zoo_sources(zoo)

# 2. Merge with ESM, decompose the residuals into rank-32 experts, compute prototypes.
artifact = build_artifact(pretrained, tasks, BuildOptions(rank=32, routed_kinds=("qkv", "fc")))
path = save_artifact(artifact, Path(tempfile.mkdtemp()) / "artifact")
print(f"artifact written to {path}, alpha = {artifact.build['alpha']:.2f}")

# 3. Serve it: the router picks each image's task and the matching head.
predictor = Predictor.load(path)
for task in zoo.tasks:
    images, labels = zoo.split(task, "test")
    predictions = predictor.predict(list(images[:8]), return_routes=True)
    correct = sum(p.task == task and p.label == zoo.class_names(task)[y] for p, y in zip(predictions, labels[:8]))
    print(f"{task:>10}: routed to {[p.task for p in predictions[:3]]}..., {correct}/8 correct without the task")
