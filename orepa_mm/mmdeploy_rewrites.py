"""Rewrites that ``tools/deploy.py`` adds to mmdeploy's, so that a deployed model
computes what the PyTorch model computes.

**Adaptive average pooling.** mmdeploy 1.3.1 exports ``F.adaptive_avg_pool2d`` (PSPNet's pyramid pooling,
many necks) as ``avg_pool2d`` with kernel and stride ``input // output``.
That equals adaptive pooling only where every input size is a multiple of
the output size: PSPNet's bins (1, 2, 3, 6) on a 16 x 32 feature map (a
128 x 256 image at output stride 8) or on Cityscapes' 128 x 256 give
different bins (mIoU moved by 0.25 on the toy PSPNet).  Here adaptive
average pooling is exported exactly, for static and dynamic shapes, as two
matrix products with averaging matrices built from the input's size:
``out = P_h @ x @ P_w^T``, where row ``i`` of ``P`` averages the input rows
``floor(i * n / m)`` to ``ceil((i + 1) * n / m) - 1``, PyTorch's bins.

**The RPN's proposals.** mmdeploy's RPN post-processing runs one NMS over
the proposals of all FPN levels together, keeps them only above its
``score_threshold`` (0.05) and does not drop boxes of zero width or height.
mmdet runs NMS per level (``batched_nms`` with the level as the class), with
no score threshold, after dropping boxes not wider and taller than
``min_bbox_size``.  The rewrite gives mmdeploy's multi-class NMS one column
per level (a proposal's score in its level's column, -1 elsewhere and for
dropped boxes, with a threshold below every real score), which is mmdet's
rule; the RoI head then sees mmdet's proposals.  (On the toy Faster R-CNN,
AP50 differed by 0.001 without it.)

:func:`register` adds the rewrites (pooling: ONNX Runtime and TensorRT; RPN:
ONNX Runtime, whose NMS it was checked with); it needs mmdeploy and is
idempotent.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ['adaptive_avg_pool2d_by_matmul', 'pooling_matrix', 'register']

#: The backends that get the exact rewrite.
BACKENDS = ('onnxruntime', 'tensorrt')


def pooling_matrix(n_in: Union[int, Tensor], n_out: int, like: Tensor) -> Tensor:
    """The ``(n_out, n_in)`` matrix of adaptive average pooling along one axis
    (PyTorch's bins), in ``like``'s dtype and device.  ``n_in`` may be a traced
    size, so that a dynamic-shape export builds the matrix at run time."""
    rows = torch.arange(n_out, device=like.device)
    cols = torch.arange(n_in, device=like.device)
    start = torch.div(rows * n_in, n_out, rounding_mode='floor')
    end = torch.div((rows + 1) * n_in + n_out - 1, n_out, rounding_mode='floor')
    inside = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d_by_matmul(x: Tensor, output_size: Union[int, Sequence[Optional[int]]]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` as ``P_h @ x @ P_w^T``."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = x.shape[-2], x.shape[-1]
    out_h = h if out_h is None else out_h
    out_w = w if out_w is None else out_w
    return torch.matmul(torch.matmul(pooling_matrix(h, out_h, x), x), pooling_matrix(w, out_w, x).transpose(0, 1))


def _exact_adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if all(s == 1 for s in size):
        return input.mean((-2, -1), keepdim=True)
    return adaptive_avg_pool2d_by_matmul(input, size)


#: Below every score a proposal can have (a sigmoid or softmax is >= 0).
_DROPPED = -1.0


def _rpn_predict_by_feat_per_level(self, cls_scores, bbox_preds, score_factors=None, batch_img_metas=None,
                                   cfg=None, rescale=False, with_nms=True, **kwargs):
    """``RPNHead.predict_by_feat`` for export, with mmdet's proposal rule
    (module docstring): per level the ``nms_pre`` best anchors, decoded and
    clipped to the image; boxes not larger than ``min_bbox_size`` dropped;
    NMS per level; the ``max_per_img`` best kept."""
    from mmdeploy.codebase.mmdet.deploy import gather_topk, get_post_processing_params, pad_with_value_if_necessary
    from mmdeploy.core import FUNCTION_REWRITER
    from mmdeploy.mmcv.ops import multiclass_nms
    deploy_cfg = FUNCTION_REWRITER.get_context().cfg
    cfg = self.test_cfg if cfg is None else cfg
    if cfg.nms.get('type', 'nms') != 'nms':
        raise NotImplementedError(f'RPN proposals with {cfg.nms.type}: only plain NMS is exported')
    pre_topk = cfg.get('nms_pre', -1)
    batch = cls_scores[0].shape[0]
    priors = self.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], device=cls_scores[0].device)
    boxes, scores, levels = [], [], []
    for level, (cls, reg, prior) in enumerate(zip(cls_scores, bbox_preds, priors)):
        cls = cls.permute(0, 2, 3, 1)
        score = (cls.reshape(batch, -1).sigmoid() if self.use_sigmoid_cls
                 else cls.reshape(batch, -1, 2).softmax(-1)[..., 0])
        delta = reg.permute(0, 2, 3, 1).reshape(batch, -1, self.bbox_coder.encode_size)
        prior = prior.unsqueeze(0)
        if pre_topk > 0:  # a level with fewer anchors is padded with proposals NMS never keeps
            score = pad_with_value_if_necessary(score, 1, pre_topk, _DROPPED)
            delta = pad_with_value_if_necessary(delta, 1, pre_topk)
            prior = pad_with_value_if_necessary(prior, 1, pre_topk)
            score, top = score.topk(pre_topk)
            delta = gather_topk(delta, inds=top, batch_size=batch, is_batched=True)
            prior = gather_topk(prior, inds=top, batch_size=batch, is_batched=False)
        boxes.append(self.bbox_coder.decode(prior, delta, max_shape=batch_img_metas[0]['img_shape']))
        scores.append(score)
        levels.append(torch.full_like(score, level, dtype=torch.long))
    boxes, scores, levels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels, 1)
    if not with_nms:
        return boxes, scores[..., None]
    keep = scores > _DROPPED
    min_size = cfg.get('min_bbox_size', -1)
    if min_size >= 0:
        keep = keep & (boxes[..., 2] - boxes[..., 0] > min_size) & (boxes[..., 3] - boxes[..., 1] > min_size)
    columns = torch.arange(len(cls_scores), device=levels.device)
    per_level = torch.where((levels[..., None] == columns) & keep[..., None], scores[..., None],
                            scores.new_full((), _DROPPED))
    post = get_post_processing_params(deploy_cfg)
    keep_top_k = cfg.get('max_per_img', post.keep_top_k)
    dets, _ = multiclass_nms(boxes, per_level, keep_top_k, iou_threshold=cfg.nms.get('iou_threshold'),
                             score_threshold=_DROPPED / 2, pre_top_k=-1, keep_top_k=keep_top_k)
    return dets, torch.zeros_like(dets[..., 0], dtype=torch.long)  # mmdet's proposals are all label 0


def _bbox_head_predict_by_feat_per_class(self, rois, cls_scores, bbox_preds, batch_img_metas, rcnn_test_cfg=None,
                                         rescale=False):
    """``BBoxHead.predict_by_feat`` for export with mmdet's rule: every class
    keeps its own regressed box (module docstring)."""
    import torch.nn.functional as F
    from mmdeploy.mmcv.ops import multiclass_nms
    from mmdet.structures.bbox import get_box_tensor
    if bbox_preds is None or rcnn_test_cfg.nms.get('type', 'nms') != 'nms':
        raise NotImplementedError('the RoI head is exported with box regression and plain NMS only')
    scores = self.loss_cls.get_activation(cls_scores) if self.custom_cls_channels else F.softmax(cls_scores, -1)
    scores = scores[..., :self.num_classes]  # (B, N, C), the background left out
    batch, rois_per_image, classes = scores.shape
    boxes = get_box_tensor(self.bbox_coder.decode(rois[..., 1:], bbox_preds,
                                                  max_shape=batch_img_metas[0]['img_shape']))
    boxes = boxes.reshape(batch, rois_per_image, -1, 4).expand(batch, rois_per_image, classes, 4)
    # Entry n * C + c: RoI n's box and score for class c, a candidate of class c only.
    label = torch.arange(classes, device=scores.device)
    one_hot = label.repeat(rois_per_image)[:, None] == label[None, :]
    per_class = torch.where(one_hot[None], scores.reshape(batch, -1, 1), scores.new_full((), _DROPPED))
    keep_top_k = rcnn_test_cfg.max_per_img
    return multiclass_nms(boxes.reshape(batch, -1, 4), per_class, keep_top_k,
                          iou_threshold=rcnn_test_cfg.nms.iou_threshold, score_threshold=rcnn_test_cfg.score_thr,
                          pre_top_k=-1, keep_top_k=keep_top_k)


_registered = False


def register() -> None:
    """Register the rewrites with mmdeploy's function rewriter (a backend's
    rewrite takes precedence over mmdeploy's default one)."""
    global _registered
    if _registered:
        return
    from mmdeploy.core import FUNCTION_REWRITER
    for backend in BACKENDS:
        FUNCTION_REWRITER.register_rewriter(func_name='torch.nn.functional.adaptive_avg_pool2d',
                                            backend=backend)(_exact_adaptive_avg_pool2d)
    FUNCTION_REWRITER.register_rewriter(func_name='mmdet.models.dense_heads.rpn_head.RPNHead.predict_by_feat',
                                        backend='onnxruntime')(_rpn_predict_by_feat_per_level)
    FUNCTION_REWRITER.register_rewriter(
        func_name='mmdet.models.roi_heads.bbox_heads.bbox_head.BBoxHead.predict_by_feat',
        backend='onnxruntime')(_bbox_head_predict_by_feat_per_class)
    _registered = True
