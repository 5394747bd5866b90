# mmseg models: the label map (argmax in the graph).  mmdeploy exports
# whole-image inference; a config that tests with mode='slide' is deployed
# as whole-image inference.
_base_ = ['./onnx_config.py']
codebase_config = dict(type='mmseg', task='Segmentation', with_argmax=True)
