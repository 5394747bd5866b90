# mmpretrain classifiers: the class scores.
_base_ = ['./onnx_config.py']
codebase_config = dict(type='mmpretrain', task='Classification')
