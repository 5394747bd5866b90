"""Tests for tools/model_converters/convert_reference_checkpoint.py on synthetic reference checkpoints.

The synthetic checkpoints follow the key/shape lists of the authors' OREPA ResNet-18/50 (training form) and
ResNet-50 (deploy form) in ``tests/data/orepa_reference/`` (copied from ``shared/reference/``), with random
values.  The kernels the reference model computes are derived here, independently of orepa_mm, from the
formulas of the reference code (docs/method.md, "The reference checkpoint layout"), including the stem's
composition by cross-correlation (``conv2d(padding=2)`` without flip).  A vanilla mmdet ResNet holding those
kernels and BNs is the expected model; the converted checkpoints must load strictly and compute the same.
"""
from __future__ import annotations

import math
import re
import runpy
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet
from torch import Tensor

import orepa_mm  # noqa: F401  (registers conv_cfg type 'OREPA')

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'model_converters' / 'convert_reference_checkpoint.py'
LAYOUTS = Path(__file__).resolve().parent / 'data' / 'orepa_reference'
sys.path.insert(0, str(SCRIPT.parent))

import convert_reference_checkpoint as crc  # noqa: E402

REL_TOL = 1e-5
OREPA_CFG = dict(type='OREPA')

# -- synthetic reference checkpoints ---------------------------------------------------------------------


def read_layout(name: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(key, shape)`` rows of a TSV key list."""
    rows = []
    for line in (LAYOUTS / name).read_text().splitlines()[1:]:
        key, shape = line.split('\t')
        rows.append((key, () if shape == 'scalar' else tuple(int(s) for s in shape.split('x'))))
    return rows


def prior_buffer(out: int) -> Tensor:
    """The reference's 3x3 frequency prior, element by element as docs/method.md states it."""
    buf = torch.empty(out, 3, 3)
    for o in range(out):
        for h in range(3):
            for w in range(3):
                if o < out / 2:
                    buf[o, h, w] = math.cos(math.pi * (h + 0.5) * (o + 1) / 3)
                else:
                    buf[o, h, w] = math.cos(math.pi * (w + 0.5) * (o + 1 - out / 2) / 3)
    return buf


def synth_reference(layout: str, seed: int) -> Dict[str, Tensor]:
    """Random values for every key of the TSV ``layout``; buffers hold the reference's constants."""
    return synth_rows(read_layout(layout), seed)


def synth_rows(rows: List[Tuple[str, Tuple[int, ...]]], seed: int) -> Dict[str, Tensor]:
    """Random values for ``(key, shape)`` rows; the constant buffers hold the reference's constants."""
    g = torch.Generator().manual_seed(seed)
    priors: Dict[int, Tensor] = {}
    state: Dict[str, Tensor] = {}
    for key, shape in rows:
        leaf = key.rsplit('.', 1)[-1]
        if leaf == 'weight_orepa_avg_avg':
            t = torch.full(shape, 1 / 9)
        elif leaf == 'id_tensor':
            t = torch.eye(shape[0])[:, :, None, None]
        elif leaf == 'weight_orepa_prior':
            if shape[0] not in priors:
                priors[shape[0]] = prior_buffer(shape[0])
            t = priors[shape[0]].clone()
        elif leaf == 'num_batches_tracked':
            t = torch.randint(0, 1000, (), generator=g)
        elif leaf == 'running_var':
            t = 0.5 + torch.rand(shape, generator=g)
        elif leaf == 'running_mean':
            t = 0.1 * torch.randn(shape, generator=g)
        elif '.bn.' in key and leaf == 'weight':
            t = 0.5 + 0.5 * torch.rand(shape, generator=g)
        elif leaf == 'vector':
            t = 0.5 * torch.randn(shape, generator=g)
        elif leaf == 'bias':
            t = 0.1 * torch.randn(shape, generator=g)
        else:  # kernels: unit-gain scale
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            t = torch.empty(shape).normal_(0.0, 1 / math.sqrt(fan_in), generator=g)
        state[key] = t
    return state


# -- the reference model's kernels, computed independently ------------------------------------------------


def ref_kxk_kernel(sd: Dict[str, Tensor], p: str) -> Tensor:
    """Six-branch OREPA k x k kernel of the reference layer at prefix ``p`` (groups = 1)."""
    origin = sd[f'{p}.weight_orepa_origin']
    out, cin, k, _ = origin.shape
    v = sd[f'{p}.vector']
    col = [v[j].view(-1, 1, 1, 1) for j in range(6)]
    w = origin * col[0]
    w = w + sd[f'{p}.weight_orepa_avg_conv'] * sd[f'{p}.weight_orepa_avg_avg'].view(1, 1, k, k) * col[1]
    w = w + sd[f'{p}.weight_orepa_pfir_conv'] * sd[f'{p}.weight_orepa_prior'][:, None] * col[2]
    first = (sd[f'{p}.weight_orepa_1x1_kxk_idconv1'] + sd[f'{p}.id_tensor'])[:, :, 0, 0]
    w = w + torch.einsum('ti,othw->oihw', first, sd[f'{p}.weight_orepa_1x1_kxk_conv2']) * col[3]
    w = w + F.pad(sd[f'{p}.weight_orepa_1x1'], [k // 2] * 4) * col[4]
    dw = sd[f'{p}.weight_orepa_gconv_dw'][:, 0].reshape(cin, 8, k, k)
    pw = sd[f'{p}.weight_orepa_gconv_pw'][:, :, 0, 0].reshape(out, cin, 8)
    w = w + torch.einsum('oit,ithw->oihw', pw, dw) * col[5]
    return w


def ref_1x1_kernel(sd: Dict[str, Tensor], p: str) -> Tensor:
    v = sd[f'{p}.vector']
    origin = sd[f'{p}.weight_or1x1_origin'][:, :, 0, 0]
    pair = sd[f'{p}.weight_or1x1_l2i_conv2'][:, :, 0, 0] @ sd[f'{p}.weight_or1x1_l2i_conv1'][:, :, 0, 0]
    return (origin * v[0][:, None] + pair * v[1][:, None])[:, :, None, None]


def ref_stem_kernel(sd: Dict[str, Tensor], p: str) -> Tensor:
    """The reference large-kernel block: cross-correlate the three 3x3 kernels, as its code does."""
    k0, k1, k2 = (ref_kxk_kernel(sd, f'{p}.weight{i}') for i in range(3))
    w = F.conv2d(k0.transpose(0, 1), k1, padding=2)
    w = F.conv2d(w, k2, padding=2)
    return w.transpose(0, 1)


def mmdet_names(layer: str) -> Tuple[str, str]:
    """(conv, bn) names in an mmdet ResNet of the reference layer ``layer``."""
    if layer == 'stage0.conv1':
        return 'conv1', 'bn1'
    m = re.fullmatch(r'stage(\d)\.(\d+)\.(?:conv(\d)|shortcut)', layer)
    assert m, layer
    s, b, j = m.groups()
    if j is None:
        return f'layer{s}.{b}.downsample.0', f'layer{s}.{b}.downsample.1'
    return f'layer{s}.{b}.conv{j}', f'layer{s}.{b}.bn{j}'


def expected_train_model(sd: Dict[str, Tensor], depth: int, model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """Vanilla mmdet ResNet (``model`` if given) computing what the reference training-form model computes."""
    plain: Dict[str, Tensor] = {}
    layers = sorted({re.sub(r'\.(weight\d\.)?(weight_orepa_origin|weight_or1x1_origin|conv\.weight)$', '', k)
                     for k in sd if k.endswith(('weight_orepa_origin', 'weight_or1x1_origin', 'conv.weight'))})
    for layer in layers:
        conv, bn = mmdet_names(layer)
        with torch.no_grad():
            if layer == 'stage0.conv1':
                kernel = ref_stem_kernel(sd, layer)
            elif f'{layer}.conv.weight' in sd:
                kernel = sd[f'{layer}.conv.weight']
            elif f'{layer}.weight_or1x1_origin' in sd:
                kernel = ref_1x1_kernel(sd, layer)
            else:
                kernel = ref_kxk_kernel(sd, layer)
        plain[f'{conv}.weight'] = kernel
        for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
            plain[f'{bn}.{name}'] = sd[f'{layer}.bn.{name}']
    model = model if model is not None else ResNet(depth=depth)
    model.load_state_dict(plain, strict=True)
    return model


def expected_deploy_model(sd: Dict[str, Tensor], depth: int) -> torch.nn.Module:
    """Vanilla mmdet ResNet computing ``conv(x, W) + b`` per layer: identity BNs, the bias added by a hook."""
    model = ResNet(depth=depth)
    plain = {k: v for k, v in model.state_dict().items()}
    for key, weight in sd.items():
        m = re.fullmatch(r'(.*)\.(?:or_large|or1x1|orepa)_reparam\.weight', key)
        if not m:
            continue
        conv, bn = mmdet_names(m.group(1))
        plain[f'{conv}.weight'] = weight
        bias = sd[key[:-len('weight')] + 'bias']
        module = model.get_submodule(conv)
        module.register_forward_hook(lambda mod, args, out, b=bias: out + b.view(1, -1, 1, 1))
        norm = model.get_submodule(bn)
        norm.eps = 0.0
        plain.update({f'{bn}.weight': torch.ones_like(bias), f'{bn}.bias': torch.zeros_like(bias),
                      f'{bn}.running_mean': torch.zeros_like(bias), f'{bn}.running_var': torch.ones_like(bias)})
    model.load_state_dict(plain, strict=True)
    return model


def run(model: torch.nn.Module, x: Tensor) -> Tuple[Tensor, ...]:
    model.eval()  # mmdet's ResNet.train() returns None, so no chaining
    with torch.no_grad():
        return tuple(model(x))


def assert_same_outputs(actual: Tuple[Tensor, ...], expected: Tuple[Tensor, ...]) -> None:
    assert len(actual) == len(expected) == 4
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = e.abs().max().item()
        assert math.isfinite(scale) and scale > 0
        err = (a - e).abs().max().item()
        assert err <= REL_TOL * scale, f'stage {i + 1}: max error {err:.3g} > {REL_TOL} * {scale:.3g}'


def load_strict(model: torch.nn.Module, state: Dict[str, Tensor]) -> torch.nn.Module:
    model.load_state_dict(state, strict=True)
    return model


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def x() -> Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope='module')
def r18(x: Tensor, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    """ResNet-18: the synthetic checkpoint (in memory, and saved as the authors ship it: ``.pth.tar``, keys
    prefixed ``module.``), the expected outputs and the target model."""
    sd = synth_reference('official_orepa_resnet18_train_keys.tsv', seed=18)
    files = tmp_path_factory.mktemp('r18')
    torch.save({'state_dict': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 120}, files / 'orepa_res18.pth.tar')
    return dict(sd=sd, expected=run(expected_train_model(sd, 18), x), orepa=ResNet(depth=18, conv_cfg=OREPA_CFG),
                official=files / 'orepa_res18.pth.tar')


@pytest.fixture(scope='module')
def r50(x: Tensor) -> Dict:
    """ResNet-50, built once: the synthetic checkpoints, the expected outputs and the target models."""
    train = synth_reference('official_orepa_resnet50_train_keys.tsv', seed=50)
    deploy = synth_reference('official_orepa_resnet50_deploy_keys.tsv', seed=51)
    vanilla = ResNet(depth=50)  # the expected model first, then the target of the fused conversions
    return dict(train=train, deploy=deploy, expected_train=run(expected_train_model(train, 50, vanilla), x),
                expected_deploy=run(expected_deploy_model(deploy, 50), x),
                orepa=ResNet(depth=50, conv_cfg=OREPA_CFG), vanilla=vanilla)


def cli(args: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    code = crc.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('cout', [2, 6, 16, 64])
def test_prior_rotation_sign(cout: int) -> None:
    """Rotating the 3x3 frequency prior by 180 degrees multiplies each row by the sign the converter uses."""
    basis = orepa_mm.kernels.frequency_prior(cout, 3, dtype=torch.float64)
    sign = crc._prior_rotation_sign(cout)
    assert set(sign.tolist()) <= {-1.0, 1.0}
    assert torch.allclose(basis.flip(-1, -2), sign[:, None, None] * basis, rtol=0, atol=1e-12)
    with pytest.raises(crc.ConversionError, match='odd width'):
        crc._prior_rotation_sign(cout + 1)


def test_stem_mapping_reproduces_cross_correlation() -> None:
    """The stem's three 3x3 generators map onto orepa_mm's true composition exactly (flipped generators)."""
    mapping = crc.STEM_FLIPPED
    narrow = {64: 16, 512: 128}  # the ResNet-18 stem rows at a quarter of the width
    rows = [(key, tuple(narrow.get(d, d) for d in shape))
            for key, shape in read_layout('official_orepa_resnet18_train_keys.tsv') if key.startswith('stage0.')]
    sd = synth_rows(rows, seed=7)
    reader = crc._Reader(sd)
    layer = crc._read_stem(reader, crc._Modules(), crc.LayerSpec('stage0.conv1', 'conv1', 'bn1', 3, 16, 7))
    assert layer.stem_mapping == mapping
    origin_scale = 0.0 if mapping == crc.STEM_FLIPPED else 1.0
    expected_scales = torch.tensor([[origin_scale], [1 - origin_scale]]).expand(2, 16)
    assert torch.equal(layer.branches['branch_scales'], expected_scales)
    conv = orepa_mm.OREPAConv2d(3, 16, 7, padding=3, bias=False)
    conv.branches.load_state_dict(layer.branches, strict=True)
    expected = ref_stem_kernel(sd, 'stage0.conv1')
    got = conv.weight.detach()
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # orepa_mm's true composition of the unflipped generators is a different kernel
    # (docs/method.md, reference defect 5).
    true_stack = orepa_mm.kernels.compose_stack([ref_kxk_kernel(sd, f'stage0.conv1.weight{i}') for i in range(3)])
    assert (true_stack - expected).abs().max() > 1e-2 * expected.abs().max()


def test_resnet18_cli_pth_tar_module_prefix(r18: Dict, x: Tensor, tmp_path: Path, capsys) -> None:
    """The authors' file layout converts through the CLI; an existing output is kept unless ``--force``."""
    dst = tmp_path / 'out' / 'orepa_r18.pth'
    dst.parent.mkdir()
    dst.write_bytes(b'keep me')
    code, _, err = cli([r18['official'], dst], capsys)
    assert code == 2 and '--force' in err
    assert dst.read_bytes() == b'keep me'
    code, out, err = cli([r18['official'], dst, '--force'], capsys)
    assert code == 0, err
    assert 'ResNet-18, train form' in out and 'linear.weight' in out and crc.STEM_FLIPPED in out
    ckpt = torch.load(dst, weights_only=True)
    meta = ckpt['meta']
    assert (meta['depth'], meta['form'], meta['target'], meta['stem_mapping']) == (18, 'train', 'OREPAResNet',
                                                                                   crc.STEM_FLIPPED)
    assert meta['dropped_keys'] == ['linear.bias', 'linear.weight']
    assert_same_outputs(run(load_strict(r18['orepa'], ckpt['state_dict']), x), r18['expected'])
    # The ResNet-18 shortcut (a plain conv in the reference) is stored as explicit OREPA branch values.
    scales = ckpt['state_dict']['layer2.0.downsample.0.branches.branch_scales']
    assert torch.equal(scales, torch.tensor([[1.0], [0.0]]).expand(2, 128))
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no temporary file left behind


def test_resnet18_fused(r18: Dict, x: Tensor) -> None:
    result = crc.convert(r18['sd'], fused=True)
    assert (result.depth, result.form, result.target) == (18, 'train', 'ResNet')
    assert result.layer_kinds == {'OREPA stem': 1, 'OREPA 3x3': 16, 'plain conv': 3}
    assert_same_outputs(run(load_strict(ResNet(depth=18), result.state_dict), x), r18['expected'])


def test_extract_state_dict_forms() -> None:
    """A bare state dict, a ``state_dict`` entry, and keys with or without ``module.`` all read the same."""
    t = torch.zeros(2)
    for obj in ({'a.b': t}, {'module.a.b': t}, {'state_dict': {'module.a.b': t}, 'epoch': 3},
                {'state_dict': {'a.b': t}}):
        assert list(crc.extract_state_dict(obj)) == ['a.b']
    with pytest.raises(crc.ConversionError, match='with and without'):
        crc.extract_state_dict({'a.b': t, 'module.a.b': t})


def test_resnet50_train_to_orepa(r50: Dict, x: Tensor) -> None:
    result = crc.convert({'state_dict': r50['train']})
    assert (result.depth, result.form, result.stem_mapping) == (50, 'train', crc.STEM_FLIPPED)
    assert result.layer_kinds == {'OREPA stem': 1, 'OREPA 1x1': 36, 'OREPA 3x3': 16}
    assert_same_outputs(run(load_strict(r50['orepa'], result.state_dict), x), r50['expected_train'])


def test_resnet50_train_fused(r50: Dict, x: Tensor) -> None:
    result = crc.convert(r50['train'], fused=True)
    assert_same_outputs(run(load_strict(r50['vanilla'], result.state_dict), x), r50['expected_train'])


@pytest.mark.parametrize('fused', [False, True], ids=['orepa', 'fused'])
def test_resnet50_deploy(r50: Dict, x: Tensor, fused: bool) -> None:
    result = crc.convert({'state_dict': {f'module.{k}': v for k, v in r50['deploy'].items()}}, fused=fused)
    assert (result.depth, result.form) == (50, 'deploy')
    assert result.dropped_keys == ['linear.bias', 'linear.weight']
    model = r50['vanilla'] if fused else r50['orepa']
    assert_same_outputs(run(load_strict(model, result.state_dict), x), r50['expected_deploy'])
    bn = result.state_dict['bn1.weight']
    assert torch.allclose(bn, torch.full_like(bn, math.sqrt(1 + 1e-5)))


def _small_bad_inputs(tmp_path: Path) -> Dict[str, Tuple[Path, str]]:
    missing = tmp_path / 'missing.pth.tar'
    truncated = tmp_path / 'truncated.pth.tar'
    torch.save({'state_dict': {'stage0.conv1.bn.weight': torch.randn(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    wrong = tmp_path / 'torchvision.pth'
    torch.save({'conv1.weight': torch.randn(64, 3, 7, 7), 'bn1.weight': torch.randn(64)}, wrong)
    not_dict = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], not_dict)
    return {'missing': (missing, 'not found'), 'truncated': (truncated, 'corrupt or truncated'),
            'wrong-layout': (wrong, 'unknown layout'), 'not-a-dict': (not_dict, 'unknown layout')}


@pytest.mark.parametrize('case', ['missing', 'truncated', 'wrong-layout', 'not-a-dict'])
def test_bad_input_files(case: str, tmp_path: Path, capsys) -> None:
    src, message = _small_bad_inputs(tmp_path)[case]
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    code, _, err = cli([src, out_dir / 'x.pth'], capsys)
    assert code == 2
    assert err.startswith('convert_reference_checkpoint: error: ') and message in err, err
    assert err.count('\n') == 1, err
    assert list(out_dir.iterdir()) == []


def _mutations(sd: Dict[str, Tensor]) -> Dict[str, Tuple[Dict[str, Tensor], str]]:
    missing = dict(sd)
    del missing['stage1.0.conv1.vector']
    shape = dict(sd, **{'stage1.0.conv2.weight_orepa_origin': torch.zeros(64, 64, 5, 5)})
    prior = dict(sd, **{'stage0.conv1.weight1.weight_orepa_prior': torch.zeros(64, 3, 3)})
    extra = dict(sd, **{'stage1.0.se.fc.weight': torch.zeros(3)})
    depth = dict(sd, **{k.replace('stage3.1.', 'stage3.2.'): v for k, v in sd.items() if k.startswith('stage3.1.')})
    return {'missing-key': (missing, "missing key 'stage1.0.conv1.vector'"),
            'wrong-shape': (shape, 'stage1.0.conv2.weight_orepa_origin has shape'),
            'prior-buffer': (prior, 'frequency-prior basis'),
            'unexpected-key': (extra, 'unexpected keys'),
            'depth': (depth, 'unsupported depth')}


@pytest.mark.parametrize('case', ['missing-key', 'wrong-shape', 'prior-buffer', 'unexpected-key', 'depth'])
def test_bad_layouts(case: str, r18: Dict) -> None:
    sd, message = _mutations(r18['sd'])[case]
    with pytest.raises(crc.ConversionError, match=re.escape(message)):
        crc.convert(sd)


def test_script_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Run as a program, the script reports failure through its exit status (in-process: a fresh
    interpreter would spend most of the time importing mmdet)."""
    dst = tmp_path / 'x.pth'
    monkeypatch.setattr(sys, 'argv', [str(SCRIPT), str(tmp_path / 'nope.pth.tar'), str(dst)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPT), run_name='__main__')
    assert exc.value.code == 2
    assert 'checkpoint not found' in capsys.readouterr().err
    assert not dst.exists()


# -- the whole classifier, in mmpretrain's format ----------------------------------------------------------
CLASSIFIER_CASES = {'r18-train': ('official_orepa_resnet18_train_keys.tsv', 18),
                    'r50-train': ('official_orepa_resnet50_train_keys.tsv', 50),
                    'r50-deploy': ('official_orepa_resnet50_deploy_keys.tsv', 50)}


@pytest.mark.parametrize('fused', [False, True], ids=['orepa', 'fused'])
@pytest.mark.parametrize('case', sorted(CLASSIFIER_CASES))
def test_classifier_logits_float64(case: str, fused: bool, tmp_path: Path, capsys) -> None:
    """``--classifier`` writes an mmpretrain ``ImageClassifier`` whose logits, in float64, are the reference
    model's (its backbone as derived above, then global average pooling and ``linear``) within 1e-6 of their
    scale; the checkpoint's ``meta['model']`` builds that classifier."""
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS

    layout, depth = CLASSIFIER_CASES[case]
    sd = {k: v.double() if v.is_floating_point() else v
          for k, v in synth_reference(layout, seed=depth + len(case)).items()}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if case.endswith('deploy'):
        backbone = expected_deploy_model(sd, depth).double()
    else:
        backbone = expected_train_model(sd, depth, ResNet(depth=depth).double())
    expected = run(backbone, x)[-1].mean((2, 3)) @ sd['linear.weight'].T + sd['linear.bias']

    src, dst = tmp_path / 'ref.pth.tar', tmp_path / 'classifier.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, src)
    code, out, err = cli([src, dst, '--classifier'] + (['--fused'] if fused else []), capsys)
    assert code == 0, err
    assert 'ImageClassifier' in out
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt['meta']['dropped_keys'] == []
    model = MMPRETRAIN_MODELS.build(ckpt['meta']['model']).double()
    assert type(model.backbone).__name__ == ('ResNet' if fused else 'OREPAResNet')
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(x, mode='tensor')
    assert logits.shape == (2, sd['linear.weight'].shape[0])
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= 1e-6 * scale


def test_classifier_needs_the_linear_layer(r18: Dict) -> None:
    headless = {k: v for k, v in r18['sd'].items() if not k.startswith('linear.')}
    with pytest.raises(crc.ConversionError, match='no classifier'):
        crc.convert(headless, classifier=True)
    wrong = dict(r18['sd'], **{'linear.weight': torch.zeros(10, 2048)})
    with pytest.raises(crc.ConversionError, match='do not fit a ResNet-18 classifier'):
        crc.convert(wrong, classifier=True)
