import torch

from esmpp.experts import residual_expert, task_prototypes


def test_prototypes_mean_kmeans_and_every_image():
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    single = task_prototypes(means)
    torch.testing.assert_close(single[0], torch.nn.functional.normalize(means.mean(0), dim=0))
    clustered = task_prototypes(means, count=2)
    assert clustered.shape == (2, 8)
    torch.testing.assert_close(clustered.norm(dim=-1), torch.ones(2))
    every = task_prototypes(means, count=8)  # more prototypes than images: every image, repeated cyclically
    torch.testing.assert_close(every[:6], torch.nn.functional.normalize(means, dim=-1))
    torch.testing.assert_close(every[6:], every[:2])


def test_full_rank_expert_restores_the_residual():
    generator = torch.Generator().manual_seed(1)
    residual = torch.randn(5, 4, generator=generator)
    inputs = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    up, down = residual_expert(residual, inputs.T @ inputs, 20, rank=5)
    torch.testing.assert_close(up @ down, residual, atol=1e-5, rtol=1e-5)
