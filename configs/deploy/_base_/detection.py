# mmdet models: boxes and labels after NMS (mmdeploy's end-to-end detector).
# Where the model's test_cfg sets score_thr, nms.iou_threshold and
# max_per_img, mmdeploy takes those, so the deployed model keeps what the
# PyTorch model keeps; these values are used only where it does not.
_base_ = ['./onnx_config.py']
onnx_config = dict(output_names=['dets', 'labels'])
codebase_config = dict(
    type='mmdet',
    task='ObjectDetection',
    model_type='end2end',
    post_processing=dict(
        score_threshold=0.05,
        confidence_threshold=0.005,
        iou_threshold=0.5,
        max_output_boxes_per_class=200,
        pre_top_k=5000,
        keep_top_k=100,
        background_label_id=-1))
