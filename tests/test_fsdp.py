"""Batched generation under mmengine's ``FSDPStrategy`` with
``use_orig_params=True`` (the mode that keeps per-layer parameters, as
mmengine's optimizer constructors need): the original parameters are views
into FSDP's flat buffer, which FSDP sets again at every forward, and packing
must not break them.  One process (gloo on the CPU, nccl on CUDA), where
FSDP runs unsharded (NO_SHARD); sharding needs several GPUs.  After three training
steps through the strategy, the checkpoint it writes
(``model_state_dict()``) equals the per-layer definition's after three SGD
steps, with generation eager and replayed from recordings (CUDA graphs on
CUDA; simulated on the CPU, where the replays read the storage they were
recorded with, as a graph's do)."""
from __future__ import annotations

import os

import pytest
import torch
from mmengine.model import BaseModel
from test_batched_generation import capture, loss_of, per_layer, rel, resnet, run_workers, use_device_in_worker  # noqa: F401  (capture, per_layer: fixtures)

pytestmark = pytest.mark.core  # mmengine and torch only: the GPU check and the compatibility job run it

STEPS = 3
LR = 0.01


class _Net(BaseModel):
    """The slim ResNet as an mmengine model whose loss is the tests' ``loss_of``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = resnet()

    def forward(self, inputs: torch.Tensor, data_samples=None, mode: str = 'loss') -> dict:
        return dict(loss=loss_of(self.net(inputs)))


def _inputs(device: torch.device) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, device='cpu',
                       generator=torch.Generator().manual_seed(0)).to(device)


def _fsdp_worker(rank: int, rendezvous: str, work_dir: str, path: str, device_type: str, mode: str) -> None:
    import datetime

    import torch.distributed as dist
    from mmengine._strategy import FSDPStrategy

    from orepa_mm.layers import batched_generation, generation_capture

    os.environ.update(GLOO_SOCKET_IFNAME='lo', RANK='0', LOCAL_RANK='0', WORLD_SIZE='1')
    on_cuda = device_type == 'cuda'
    dist.init_process_group('nccl' if on_cuda else 'gloo', init_method=f'file://{rendezvous}', rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    use_device_in_worker(device_type, 0)
    packs, recordings = [], []
    pack, record = batched_generation._Group._pack, generation_capture._Recording.__init__

    def counting_packs(self, members):
        packs.append(len(members))
        return pack(self, members)

    def counting_recordings(self, fn, backend):
        recordings.append(backend)
        return record(self, fn, backend)
    batched_generation._Group._pack = counting_packs
    generation_capture._Recording.__init__ = counting_recordings
    generation_capture.set_generation_capture(mode)

    wrapper = dict(type='MMFullyShardedDataParallel', use_orig_params=True)
    if not on_cuda:  # mmengine's default device_id is the GPU of LOCAL_RANK
        wrapper['device_id'] = torch.device('cpu')
    strategy = FSDPStrategy(work_dir=work_dir, model_wrapper=wrapper,
                            env_kwargs=dict(dist_cfg=dict(backend='nccl' if on_cuda else 'gloo')))
    model, optim_wrapper = strategy.prepare(
        _Net(), optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=LR)))
    packs_per_step, recordings_per_step = [], []
    for _ in range(STEPS):
        model.train_step(dict(inputs=_inputs(torch.device(device_type))), optim_wrapper)
        packs_per_step.append(len(packs) - sum(packs_per_step))
        recordings_per_step.append(len(recordings) - sum(recordings_per_step))
    state = {k: v.cpu() for k, v in strategy.model_state_dict().items()}
    torch.save(dict(state=state, packs=packs_per_step, recordings=recordings_per_step), path)
    os._exit(0)  # as in the DDP test: no process-group teardown at exit


def _fsdp_runs_on_cpu() -> bool:
    """Whether this torch's FSDP can run on the CPU: it asks the device's
    module for a stream with a priority, which torch 2.1's CPU stream refuses."""
    try:
        torch.cpu.Stream(priority=-1)
    except (TypeError, AttributeError):
        return False
    return True


@pytest.mark.timeout(300)
def test_mmengine_fsdp_strategy_trains_like_per_layer(tmp_path, per_layer, device, capture):  # noqa: F811
    if device.type == 'cpu' and not _fsdp_runs_on_cpu():
        pytest.skip(f"torch {torch.__version__}'s FSDP does not run on the CPU")
    path = str(tmp_path / 'fsdp.pt')
    run_workers(_fsdp_worker, (str(tmp_path / 'rendezvous'), str(tmp_path / 'work_dir'), path, device.type,
                               capture), nprocs=1)
    got = torch.load(path)
    per_layer()
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        loss_of(model.net(_inputs(device))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    assert got['state'].keys() == expected.keys(), sorted(set(got['state']) ^ set(expected))
    worst = max((rel(expected[k].double(), got['state'][k].double()), k) for k in expected)
    assert worst[0] <= 1e-9, f'{worst[1]} differs by {worst[0]:.2e} (relative)'
    # FSDP points the parameters back into its flat buffer at every forward, so
    # every group packs again every step: exact, at the cost of one copy of the
    # parameters per step (measured here; a known cost under FSDP).
    assert got['packs'][1] == got['packs'][2] > 0, got['packs']
    # The copy goes into the storage that the recordings read: recorded once
    # (generation and backward of each group), replayed after.
    # (The capture fixture gives 'off', 'cuda' on CUDA, 'simulate' elsewhere;
    # CUDA records on a group's second use, after a warm-up.)
    expected_recordings = [0] * STEPS
    if capture != 'off':
        expected_recordings[1 if capture == 'cuda' else 0] = 2 * got['packs'][0]
    assert got['recordings'] == expected_recordings, got
