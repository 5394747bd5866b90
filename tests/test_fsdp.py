"""Batched generation under FSDP with ``use_orig_params=True`` (the mode of
mmengine's ``FSDPStrategy`` that keeps per-layer parameters): the original
parameters are views into FSDP's flat buffer, which FSDP sets again at every
forward, and packing must not break them.  One process on the CPU (gloo),
where FSDP runs unsharded (NO_SHARD); sharding across GPUs is for the GPU
check.  Gradients over three SGD steps equal the per-layer definition's,
with generation eager and replayed from recordings (simulated on the CPU:
the replays read the storage they were recorded with, as a CUDA graph's
do)."""
from __future__ import annotations

import os

import pytest
import torch
from test_batched_generation import assert_same_grads, grads, loss_of, per_layer, resnet, run_workers  # noqa: F401  (per_layer: fixture)

STEPS = 3


def _fsdp_worker(rank: int, rendezvous: str, path: str, capture: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from orepa_mm.layers import batched_generation, generation_capture

    os.environ['GLOO_SOCKET_IFNAME'] = 'lo'
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    packs = []
    original = batched_generation._Group._pack

    def counting(self, members):
        packs.append(len(members))
        return original(self, members)
    batched_generation._Group._pack = counting
    recordings = []
    record = generation_capture._Recording.__init__

    def counting_recordings(self, fn, backend):
        recordings.append(backend)
        return record(self, fn, backend)
    generation_capture._Recording.__init__ = counting_recordings
    generation_capture.set_generation_capture(capture)
    model = FSDP(resnet(), use_orig_params=True, device_id=torch.device('cpu'))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_step, packs_per_step, recordings_per_step = [], [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        per_step.append({n.replace('_fsdp_wrapped_module.', ''): p.grad.detach().clone()
                         for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        packs_per_step.append(len(packs) - sum(packs_per_step))
        recordings_per_step.append(len(recordings) - sum(recordings_per_step))
    torch.save(dict(grads=per_step, packs=packs_per_step, recordings=recordings_per_step), path)
    os._exit(0)  # as in the DDP test: no process-group teardown at exit


@pytest.mark.timeout(300)
@pytest.mark.parametrize('capture', ['off', 'simulate'], ids=['eager', 'replay'])
def test_fsdp_use_orig_params_matches_per_layer(tmp_path, per_layer, capture):  # noqa: F811  (the fixture)
    path = str(tmp_path / 'fsdp.pt')
    run_workers(_fsdp_worker, (str(tmp_path / 'rendezvous'), path, capture), nprocs=1)
    got = torch.load(path)
    per_layer()
    model = resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        assert_same_grads(grads(model), got['grads'][step], 1e-9)
        opt.step()
    # FSDP points the parameters back into its flat buffer at every forward, so
    # every group packs again every step: exact, at the cost of one copy of the
    # parameters per step (measured here; a known cost under FSDP).
    assert got['packs'][1] == got['packs'][2] > 0, got['packs']
    # The copy goes into the storage that the recordings read: recorded in the
    # first step (generation and backward of each group), replayed after.
    if capture == 'off':
        assert got['recordings'] == [0] * STEPS
    else:
        assert got['recordings'][0] == 2 * got['packs'][0] and got['recordings'][1:] == [0] * (STEPS - 1), got
