"""Which necks and heads of mmdet, mmseg and mmpretrain pass ``conv_cfg`` on to their convs.

Every class registered in the frameworks' ``MODELS`` from their neck and head
packages whose constructor takes ``conv_cfg`` is built tiny with
``conv_cfg=dict(type='OREPA')``: it either builds OREPA layers, or builds
none (the argument has no effect: :data:`NO_EFFECT`, listed in the README),
or fails to build with it (:data:`REFUSES`, also in the README).  A class
that the sweep cannot build is listed in :data:`NOT_SWEPT` with the reason.
A framework version that adds a class, removes one, or starts or stops
passing ``conv_cfg`` on fails a test here, so the README's lists stay true.
(mmpretrain 1.2.0 has no neck or head that takes ``conv_cfg``.)
(Training and fusing the heads that use OREPA is ``test_necks_heads.py``'s
job; this sweep only builds.)
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.registry import DefaultScope

import orepa_mm
from framework_registry import discover, registries

PACKAGES = ('necks', 'dense_heads', 'roi_heads', 'decode_heads', 'seg_heads', 'heads')  # heads: mmpretrain's
C4 = [8, 16, 32, 64]
_DENSE = dict(num_classes=3, in_channels=32, feat_channels=32, stacked_convs=1)  # 32: GN's default groups
_DECODE = dict(in_channels=16, channels=8, num_classes=3)
_DECODE4 = dict(in_channels=C4, channels=8, num_classes=3, in_index=[0, 1, 2, 3])
_NECK = dict(in_channels=C4, out_channels=16, num_outs=4)
_ONE_ANCHOR = dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                   strides=[8, 16, 32, 64, 128])
_SSD = dict(num_classes=3, in_channels=(16, 16, 16, 16, 16, 16), stacked_convs=1,  # 0 (the default) builds none
            anchor_generator=dict(type='SSDAnchorGenerator', scale_major=False, input_size=300,
                                  basesize_ratio_range=(0.15, 0.9), strides=[8, 16, 32, 64, 100, 300],
                                  ratios=([2], [2, 3], [2, 3], [2, 3], [2], [2])))
_BBOX = dict(in_channels=16, roi_feat_size=7, num_classes=3)
_MASK = dict(num_convs=1, in_channels=16, conv_out_channels=16, num_classes=3)
_MASKFORMER = dict(in_channels=C4, feat_channels=32, out_channels=32, num_queries=4)  # 32: GN's default groups
_ATTN = dict(embed_dims=32, num_heads=2)
_FFN = dict(embed_dims=32, feedforward_channels=32)
_DECODER = dict(num_layers=1, layer_cfg=dict(self_attn_cfg=_ATTN, cross_attn_cfg=_ATTN, ffn_cfg=_FFN), init_cfg=None)
_POSITIONS = dict(num_feats=16, normalize=True)
def _maskformer_losses(scope: str) -> dict:
    """Explicit losses (the defaults are plain dicts for 133 classes, which the heads read as attributes)."""
    prefix = 'mmdet.' if scope == 'mmseg' else ''
    return dict(loss_cls=dict(type=f'{prefix}CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0,
                              reduction='mean', class_weight=[1.0] * 3 + [0.1]),
                loss_mask=dict(type=f'{prefix}CrossEntropyLoss', use_sigmoid=True, reduction='mean',
                               loss_weight=5.0),
                loss_dice=dict(type=f'{prefix}DiceLoss', use_sigmoid=True, activate=True, reduction='mean',
                               naive_dice=True, eps=1.0, loss_weight=5.0))


_MASK2FORMER = dict(_MASKFORMER, num_transformer_feat_level=3, transformer_decoder=_DECODER,
                    positional_encoding=_POSITIONS,
                    pixel_decoder=dict(type='MSDeformAttnPixelDecoder', num_outs=3, positional_encoding=_POSITIONS,
                                       encoder=dict(num_layers=1, layer_cfg=dict(
                                           self_attn_cfg=dict(_ATTN, num_levels=3, num_points=2), ffn_cfg=_FFN))))
_MASKFORMER_FULL = dict(_MASKFORMER, transformer_decoder=_DECODER, positional_encoding=_POSITIONS,
                        pixel_decoder=dict(type='TransformerEncoderPixelDecoder', positional_encoding=_POSITIONS,
                                           encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=_ATTN,
                                                                                     ffn_cfg=_FFN))))

#: ``'<scope>.<name>'`` -> tiny constructor arguments (without ``type`` and ``conv_cfg``).
CONFIGS: Dict[str, dict] = {
    'mmdet.ATSSHead': _DENSE,
    'mmdet.AutoAssignHead': _DENSE,
    'mmdet.BFP': dict(in_channels=16, num_levels=4, refine_type='conv'),
    'mmdet.BoxInstBboxHead': _DENSE,
    'mmdet.CSPNeXtPAFPN': dict(in_channels=[8, 16, 32], out_channels=16, num_csp_blocks=1),
    'mmdet.CenterNetUpdateHead': _DENSE,
    'mmdet.ChannelMapper': dict(in_channels=C4, out_channels=16),
    'mmdet.CondInstBboxHead': _DENSE,
    'mmdet.ConvFCBBoxHead': dict(_BBOX, num_shared_convs=1, num_shared_fcs=1, conv_out_channels=16,
                                 fc_out_channels=16),
    'mmdet.DDODHead': dict(_DENSE, stacked_convs=2),  # the first conv is a DCN
    'mmdet.DoubleConvFCBBoxHead': dict(_BBOX, num_convs=1, num_fcs=1, conv_out_channels=16, fc_out_channels=16),
    'mmdet.DynamicMaskHead': dict(_MASK, dynamic_conv_cfg=dict(type='DynamicConv', in_channels=16,
                                                               feat_channels=4, out_channels=16,
                                                               input_feat_shape=14)),
    'mmdet.FCNMaskHead': _MASK,
    'mmdet.FCOSHead': _DENSE,
    'mmdet.FPN': _NECK,
    'mmdet.FPN_DropBlock': dict(_NECK, plugin=dict(type='DropBlock', drop_prob=0.1, block_size=3)),
    'mmdet.FSAFHead': _DENSE,
    'mmdet.FoveaHead': _DENSE,
    'mmdet.FreeAnchorRetinaHead': _DENSE,
    'mmdet.FusedSemanticHead': dict(num_ins=4, fusion_level=1, num_convs=1, in_channels=16, conv_out_channels=16,
                                    num_classes=3),
    'mmdet.GARetinaHead': _DENSE,
    'mmdet.GFLHead': dict(_DENSE, anchor_generator=_ONE_ANCHOR),
    'mmdet.GlobalContextHead': dict(num_convs=1, in_channels=16, conv_out_channels=16, num_classes=3),
    'mmdet.GridHead': dict(grid_points=9, num_convs=8, in_channels=16, point_feat_channels=8),
    'mmdet.HRFPN': dict(in_channels=C4, out_channels=16, num_outs=4),
    'mmdet.HTCMaskHead': _MASK,
    'mmdet.LADHead': _DENSE,
    # (LDHead's default loss_ld names a loss that mmdet 3.3 does not register.)
    'mmdet.LDHead': dict(_DENSE, anchor_generator=_ONE_ANCHOR,
                         loss_ld=dict(type='KnowledgeDistillationKLDivLoss', loss_weight=0.25, T=10)),
    'mmdet.Mask2FormerHead': dict(_MASK2FORMER, num_things_classes=2, num_stuff_classes=1,
                                  **_maskformer_losses('mmdet')),
    'mmdet.MaskFormerHead': dict(_MASKFORMER_FULL, num_things_classes=2, num_stuff_classes=1,
                                 **_maskformer_losses('mmdet')),
    'mmdet.MaskPointHead': dict(num_fcs=1, in_channels=16, fc_channels=16, num_classes=3),
    'mmdet.NASFCOSHead': _DENSE,
    'mmdet.NASFCOS_FPN': dict(in_channels=C4, out_channels=16, num_outs=5, start_level=1),
    'mmdet.PAAHead': _DENSE,
    'mmdet.PAFPN': _NECK,
    'mmdet.PISARetinaHead': _DENSE,
    'mmdet.PISASSDHead': _SSD,
    'mmdet.PanopticFPNHead': dict(num_things_classes=2, num_stuff_classes=1, in_channels=16, inner_channels=32,
                                  start_level=0, end_level=2),
    'mmdet.RFP': dict(in_channels=[32, 64, 128, 256], out_channels=16, num_outs=4, rfp_steps=2,
                      aspp_out_channels=8, rfp_backbone=dict(type='DetectoRS_ResNet', depth=50, base_channels=8,
                                                             stem_channels=8, rfp_inplanes=16)),
    'mmdet.RTMDetHead': _DENSE,
    'mmdet.RTMDetInsHead': _DENSE,
    'mmdet.RTMDetInsSepBNHead': _DENSE,
    'mmdet.RTMDetSepBNHead': _DENSE,
    'mmdet.RepPointsHead': _DENSE,
    'mmdet.RetinaHead': _DENSE,
    'mmdet.RetinaSepBNHead': dict(_DENSE, num_ins=3),
    'mmdet.SABLRetinaHead': _DENSE,
    'mmdet.SCNetBBoxHead': dict(_BBOX, num_shared_convs=1, num_shared_fcs=1, conv_out_channels=16,
                                fc_out_channels=16),
    'mmdet.SCNetMaskHead': _MASK,
    'mmdet.SCNetSemanticHead': dict(num_ins=4, fusion_level=1, num_convs=1, in_channels=16, conv_out_channels=16,
                                    num_classes=3),
    'mmdet.SSDHead': _SSD,
    'mmdet.SSDNeck': dict(in_channels=(8, 16), out_channels=(8, 16, 16, 16), level_strides=(2, 2),
                          level_paddings=(1, 1)),
    'mmdet.SSH': dict(num_scales=2, in_channels=[16, 16], out_channels=[16, 16]),
    'mmdet.Shared2FCBBoxHead': dict(_BBOX, fc_out_channels=16),
    'mmdet.Shared4Conv1FCBBoxHead': dict(_BBOX, conv_out_channels=16, fc_out_channels=16),
    'mmdet.TOODHead': _DENSE,
    'mmdet.VFNetHead': _DENSE,
    'mmdet.YOLACTHead': dict(num_classes=3, in_channels=16, feat_channels=16, num_head_convs=1),
    'mmdet.YOLOV3Head': dict(num_classes=3, in_channels=[16, 8], out_channels=[16, 8],
                             anchor_generator=dict(type='YOLOAnchorGenerator',
                                                   base_sizes=[[(116, 90), (156, 198), (373, 326)],
                                                               [(30, 61), (62, 45), (59, 119)]],
                                                   strides=[32, 16]), featmap_strides=[32, 16]),
    'mmdet.YOLOV3Neck': dict(num_scales=2, in_channels=[32, 16], out_channels=[16, 8]),
    'mmdet.YOLOXHead': dict(_DENSE, stacked_convs=1),
    'mmdet.YOLOXPAFPN': dict(in_channels=[8, 16, 32], out_channels=16, num_csp_blocks=1),
    'mmseg.ANNHead': dict(in_channels=[16, 32], in_index=[0, 1], channels=8, num_classes=3, project_channels=8,
                          query_scales=(1, ), key_pool_scales=(1, 3)),
    'mmseg.APCHead': _DECODE,
    'mmseg.ASPPHead': dict(_DECODE, dilations=(1, 2)),
    'mmseg.CCHead': _DECODE,
    'mmseg.DAHead': dict(_DECODE, pam_channels=4),
    'mmseg.DDRHead': _DECODE,
    'mmseg.DMHead': _DECODE,
    'mmseg.DNLHead': _DECODE,
    'mmseg.DPTHead': dict(in_channels=(16, 16, 16, 16), channels=8, embed_dims=16, post_process_channels=[8, 8, 8, 8],
                          num_classes=3, readout_type='project', in_index=(0, 1, 2, 3),
                          input_transform='multiple_select'),
    'mmseg.DepthwiseSeparableASPPHead': dict(_DECODE, dilations=(1, 2), c1_in_channels=8, c1_channels=4),
    'mmseg.DepthwiseSeparableFCNHead': dict(_DECODE, num_convs=1),
    'mmseg.EMAHead': dict(_DECODE, ema_channels=8, num_bases=4, num_stages=1),
    'mmseg.EncHead': dict(_DECODE4, num_codes=4),
    'mmseg.FCNHead': dict(_DECODE, num_convs=1),
    'mmseg.FPN': _NECK,
    'mmseg.FPNHead': dict(_DECODE4, feature_strides=[4, 8, 16, 32]),
    'mmseg.GCHead': _DECODE,
    'mmseg.ICNeck': dict(in_channels=(8, 16, 32), out_channels=16),
    'mmseg.ISAHead': dict(_DECODE, isa_channels=8),
    'mmseg.JPU': dict(in_channels=(8, 16, 32), mid_channels=8, start_level=0, end_level=-1),
    'mmseg.IterativeDecodeHead': dict(
        num_stages=1, kernel_generate_head=dict(type='FCNHead', in_channels=16, channels=16, num_convs=1,
                                                num_classes=3),
        kernel_update_head=[dict(type='KernelUpdateHead', num_classes=3, num_ffn_fcs=1, num_heads=2, num_mask_fcs=1,
                                 feedforward_channels=16, in_channels=16, out_channels=16, dropout=0.0,
                                 conv_kernel_size=1, with_ffn=True,
                                 feat_transform_cfg=dict(conv_cfg=dict(type='Conv2d'), act_cfg=None),
                                 kernel_updator_cfg=dict(type='KernelUpdator', in_channels=16, feat_channels=16,
                                                         out_channels=16, act_cfg=dict(type='ReLU'),
                                                         norm_cfg=dict(type='LN')))]),
    'mmseg.LRASPPHead': dict(in_channels=(8, 16, 32), channels=8, num_classes=3, in_index=(0, 1, 2),
                             input_transform='multiple_select', branch_channels=(4, 8)),
    'mmseg.LightHamHead': dict(_DECODE4, in_index=[1, 2, 3], in_channels=[16, 32, 64], ham_channels=8,
                               ham_kwargs=dict(MD_R=4)),
    'mmseg.Mask2FormerHead': dict(_MASK2FORMER, num_classes=3, **_maskformer_losses('mmseg'),
                                  pixel_decoder=dict(_MASK2FORMER['pixel_decoder'],
                                                     type='mmdet.MSDeformAttnPixelDecoder')),
    'mmseg.MaskFormerHead': dict(_MASKFORMER_FULL, num_classes=3, **_maskformer_losses('mmseg'),
                                 pixel_decoder=dict(_MASKFORMER_FULL['pixel_decoder'],
                                                    type='mmdet.TransformerEncoderPixelDecoder')),
    'mmseg.NLHead': _DECODE,
    'mmseg.OCRHead': dict(_DECODE, ocr_channels=8),
    'mmseg.PIDHead': dict(in_channels=16, channels=8, num_classes=3),
    'mmseg.PSAHead': dict(_DECODE, mask_size=(8, 8), psa_softmax=True),
    'mmseg.PSPHead': dict(_DECODE, pool_scales=(1, 2)),
    'mmseg.PointHead': dict(in_channels=[16], in_index=[0], channels=8, num_fcs=1, num_classes=3),
    'mmseg.SETRMLAHead': dict(in_channels=(16, 16, 16, 16), channels=8, num_classes=3, in_index=(0, 1, 2, 3),
                              mla_channels=2),
    'mmseg.SETRUPHead': dict(_DECODE, num_convs=1),
    'mmseg.STDCHead': _DECODE,
    'mmseg.SegformerHead': _DECODE4,
    'mmseg.SegmenterMaskTransformerHead': dict(in_channels=16, channels=16, num_classes=3, num_layers=1,
                                               num_heads=2, embed_dims=16),
    'mmseg.UPerHead': dict(_DECODE4, pool_scales=(1, 2)),
}

#: Classes that take ``conv_cfg`` and build no OREPA layer with it (mmdet
#: 3.3.0, mmseg 1.2.2): every conv they have stays ``nn.Conv2d`` whatever
#: ``conv_cfg`` says.
NO_EFFECT = {
    'mmdet.Mask2FormerHead', 'mmdet.MaskFormerHead', 'mmdet.NASFCOSHead', 'mmdet.Shared2FCBBoxHead',
    'mmseg.DDRHead', 'mmseg.DPTHead', 'mmseg.DepthwiseSeparableFCNHead', 'mmseg.LRASPPHead', 'mmseg.Mask2FormerHead',
    'mmseg.MaskFormerHead', 'mmseg.PIDHead', 'mmseg.SETRMLAHead', 'mmseg.SETRUPHead', 'mmseg.SegformerHead',
    'mmseg.SegmenterMaskTransformerHead',
}

#: Classes whose build fails with ``conv_cfg=dict(type='OREPA')``: ``'<scope>.<name>'`` ->
#: (tiny arguments, a pattern of the error).
REFUSES: Dict[str, Tuple[dict, str]] = {
    # Its 2x2 stride-2 downsampling conv: an OREPA kernel needs a centre.
    'mmdet.CoarseMaskHead': (dict(num_convs=1, in_channels=16, conv_out_channels=16, fc_out_channels=16,
                                  num_classes=3), 'kernel_size must be 1 or odd'),
    # Its **kwargs go to BaseModule, which takes no conv_cfg.
    'mmseg.IterativeDecodeHead': (CONFIGS.pop('mmseg.IterativeDecodeHead'),
                                  "unexpected keyword argument 'conv_cfg'"),
}

#: ``'<scope>.<name>'`` -> why the sweep does not build it.
NOT_SWEPT: Dict[str, str] = {
    'mmdet.AnchorFreeHead': 'abstract base class',
    'mmdet.ATSSVLFusionHead': "GLIP's head: builds a HuggingFace language model",
    'mmseg.SideAdapterCLIPHead': "SAN's head: needs a whole CLIP configuration",
}


def _build(key: str, args: dict) -> nn.Module:
    scope, name = key.split('.', 1)
    cfg = ConfigDict(args, type=name, conv_cfg=dict(type='OREPA'))  # some heads read attributes
    with DefaultScope.overwrite_default_scope(scope):
        return registries()[scope].build(cfg)


def test_sweep_covers_every_conv_cfg_neck_and_head() -> None:
    found = discover(PACKAGES)
    listed = [set(CONFIGS), set(REFUSES), set(NOT_SWEPT)]
    assert sum(map(len, listed)) == len(set().union(*listed)), 'a class is listed twice'
    new = sorted(found - set().union(*listed))
    assert not new, f'necks/heads taking conv_cfg that the sweep neither builds nor lists as not swept: {new}'
    gone = sorted(set().union(*listed) - found)
    assert not gone, f'swept necks/heads that the frameworks no longer register with conv_cfg: {gone}'
    assert NO_EFFECT <= set(CONFIGS)


@pytest.mark.parametrize('key', sorted(CONFIGS))
def test_conv_cfg_reaches_the_convs_or_is_listed_as_without_effect(key: str) -> None:
    module = _build(key, CONFIGS[key])
    reparam = orepa_mm.count_reparam_layers(module)
    if key in NO_EFFECT:
        assert reparam == 0, f'{key} now builds {reparam} OREPA layer(s): remove it from NO_EFFECT and the README'
    else:
        assert reparam > 0, f'{key} builds no OREPA layer with conv_cfg: list it in NO_EFFECT and the README'


@pytest.mark.parametrize('key', sorted(REFUSES))
def test_heads_that_cannot_take_orepa_fail_to_build(key: str) -> None:
    args, error = REFUSES[key]
    with pytest.raises((ValueError, TypeError), match=error):
        _build(key, args)
