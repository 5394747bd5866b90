"""tools/slurm_train.sh and tools/slurm_test.sh, with a fake ``srun`` on PATH
that records its arguments and environment instead of starting tasks; the
recorded command line must then be one that tools/train.py or tools/test.py
accepts."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$SRUN_LOG"
printf '%s' "$PYTHONPATH" > "$SRUN_LOG.pythonpath"
"""


@pytest.fixture
def fake_srun(tmp_path: Path) -> Dict[str, str]:
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    srun = bin_dir / 'srun'
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS',
                                                             'PYTHON', 'PYTHONPATH')}
    env.update(PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}', SRUN_LOG=str(tmp_path / 'srun.log'))
    return env


def run_script(script: str, args: List[str], env: Dict[str, str], **extra: str) -> Tuple[
        subprocess.CompletedProcess, List[str]]:
    proc = subprocess.run(['bash', str(ROOT / 'tools' / script), *args], env={**env, **extra}, capture_output=True,
                          text=True, timeout=60)
    log = Path(env['SRUN_LOG'])
    return proc, log.read_text().splitlines() if log.exists() else []


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f'{name}_tool', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / 'tools'))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / 'tools'))
    return module


def split(recorded: List[str]) -> Tuple[List[str], List[str]]:
    """(srun's own options, the task's command line)."""
    i = next(i for i, a in enumerate(recorded) if not a.startswith('--'))
    return recorded[:i], recorded[i:]


def test_train_defaults_as_openmmlab(fake_srun) -> None:
    proc, recorded = run_script('slurm_train.sh', ['gpu', 'orepa-det', 'configs/x.py', 'work_dirs/x',
                                                   '--cfg-options', 'train_cfg.max_iters=10'], fake_srun)
    assert proc.returncode == 0, proc.stderr
    options, command = split(recorded)
    assert options == ['--partition=gpu', '--job-name=orepa-det', '--gres=gpu:8', '--ntasks=8',
                       '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1']
    assert command == ['python', '-u', str(ROOT / 'tools' / 'train.py'), 'configs/x.py', '--work-dir=work_dirs/x',
                       '--launcher=slurm', '--cfg-options', 'train_cfg.max_iters=10']
    assert Path(fake_srun['SRUN_LOG'] + '.pythonpath').read_text().split(os.pathsep)[0] == str(ROOT)
    args = load_tool('train').parse_args(command[3:])
    assert args.launcher == 'slurm' and args.work_dir == 'work_dirs/x' and args.config == 'configs/x.py'


def test_train_environment_knobs(fake_srun) -> None:
    proc, recorded = run_script('slurm_train.sh', ['p', 'j', 'c.py', 'w'], fake_srun, GPUS='2', CPUS_PER_TASK='3',
                                SRUN_ARGS='--quotatype=auto --time=1:00:00', PYTHON=sys.executable,
                                PYTHONPATH='/elsewhere')
    assert proc.returncode == 0, proc.stderr
    options, command = split(recorded)
    assert options == ['--partition=p', '--job-name=j', '--gres=gpu:2', '--ntasks=2', '--ntasks-per-node=2',
                       '--cpus-per-task=3', '--kill-on-bad-exit=1', '--quotatype=auto', '--time=1:00:00']
    assert command[0] == sys.executable
    assert Path(fake_srun['SRUN_LOG'] + '.pythonpath').read_text() == f'{ROOT}{os.pathsep}/elsewhere'
    proc, recorded = run_script('slurm_train.sh', ['p', 'j', 'c.py', 'w'], fake_srun, GPUS='16', GPUS_PER_NODE='8')
    assert split(recorded)[0][2:5] == ['--gres=gpu:8', '--ntasks=16', '--ntasks-per-node=8']


def test_test_script(fake_srun) -> None:
    proc, recorded = run_script('slurm_test.sh', ['gpu', 'eval', 'configs/x.py', 'ckpt.pth', '--work-dir', 'out'],
                                fake_srun, GPUS='4')
    assert proc.returncode == 0, proc.stderr
    options, command = split(recorded)
    assert options[2:4] == ['--gres=gpu:4', '--ntasks=4']
    assert command == ['python', '-u', str(ROOT / 'tools' / 'test.py'), 'configs/x.py', 'ckpt.pth',
                       '--launcher=slurm', '--work-dir', 'out']
    args = load_tool('test').parse_args(command[3:])
    assert args.launcher == 'slurm' and args.checkpoint == 'ckpt.pth' and args.work_dir == 'out'


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_missing_arguments_give_usage_and_start_nothing(fake_srun, script: str) -> None:
    proc, recorded = run_script(script, ['gpu', 'job', 'configs/x.py'], fake_srun)
    assert proc.returncode == 2 and proc.stderr.startswith('usage: bash ') and not recorded
