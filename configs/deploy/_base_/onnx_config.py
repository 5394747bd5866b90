# The ONNX export every deploy config here starts from (mmdeploy's ``onnx_config``).
# input_shape=None: the graph takes the shape of the image the export runs on
# (static configs) or is made dynamic by ``dynamic_axes`` (dynamic configs).
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=11,
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['output'],
    input_shape=None,
    optimize=False)  # mmdeploy's ONNX optimiser needs its TorchScript extension, which its wheel lacks
