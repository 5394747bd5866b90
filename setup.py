"""Packaging for orepa_mm: online convolutional re-parameterization for OpenMMLab.

Requirements live in ``requirements/``: ``runtime.txt`` is what the library
imports; ``mmdet.txt``/``mmseg.txt``/``mmpretrain.txt`` are the frameworks, as extras (so a
plain ``pip install orepa_mm`` never compiles mmcv); ``tests.txt`` the test
tools; ``constraints.txt`` the exact versions ``scripts/setup.sh`` installs
(the top of the supported ranges), ``compat.txt`` the oldest ones, which the
compatibility job tests (their bottom).
"""
import re
from pathlib import Path
from typing import List

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'orepa_mm' / 'version.py').read_text()).group(1)


def requirements(name: str) -> List[str]:
    """The requirement lines of ``requirements/<name>.txt``."""
    lines = (HERE / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


setup(
    name='orepa_mm',
    version=VERSION,
    description='Online convolutional re-parameterization (OREPA, CVPR 2022) '
    'layers, backbones and fuse tools for OpenMMLab 2.x',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['orepa_mm', 'orepa_mm.*']),
    # 3.8: the oldest compatibility job; 3.10: the users' stack; 3.11: the pinned stack; 3.12: the numpy 2
    # job (the library with mmcv-lite: mmcv 2.1.0's compiled ops have no build for Pythons after 3.11).
    python_requires='>=3.8,<3.13',
    install_requires=requirements('runtime'),
    extras_require={
        'mmdet': requirements('mmdet'),
        'mmseg': requirements('mmseg'),
        'mmpretrain': requirements('mmpretrain'),
        'tests': requirements('tests'),
        # What mmdeploy imports; mmdeploy itself: pip install --no-deps mmdeploy==1.3.1 (requirements/deploy.txt).
        'deploy': requirements('deploy'),
        'all': sorted(set(requirements('mmdet') + requirements('mmseg') + requirements('mmpretrain')
                          + requirements('tests') + requirements('deploy'))),
    },
    license='Apache-2.0',
)
