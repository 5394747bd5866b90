"""Packaging for orepa_mm: online convolutional re-parameterization for OpenMMLab."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'orepa_mm' / 'version.py').read_text()).group(1)

setup(
    name='orepa_mm',
    version=VERSION,
    description='Online convolutional re-parameterization (OREPA, CVPR 2022) '
    'layers, backbones and fuse tools for OpenMMLab 2.x',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['orepa_mm', 'orepa_mm.*']),
    python_requires='>=3.8',
    install_requires=[
        'torch>=2.0',
        'mmengine>=0.10.0,<0.11',
        'mmcv>=2.0.0,<2.2.0',
        'numpy',
    ],
    extras_require={
        'mmdet': ['mmdet>=3.0.0,<3.4'],
        'mmseg': ['mmsegmentation>=1.0.0,<1.3', 'ftfy', 'regex'],
        'tests': [
            'pytest>=7', 'pytest-timeout', 'pycocotools', 'onnx', 'onnxruntime',
            'onnxscript', 'matplotlib', 'ruff', 'tqdm',
        ],
    },
    license='Apache-2.0',
)
