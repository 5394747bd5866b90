# GPU only (TensorRT); not run by CI.  Cityscapes' full images (height 1024, width 2048).
_base_ = ['./_base_/segmentation.py', './_base_/backends/tensorrt-int8.py']
onnx_config = dict(input_shape=[2048, 1024])  # mmdeploy's order: width, height
backend_config = dict(model_inputs=[
    dict(input_shapes=dict(input=dict(
        min_shape=[1, 3, 1024, 2048], opt_shape=[1, 3, 1024, 2048], max_shape=[1, 3, 1024, 2048])))
])
