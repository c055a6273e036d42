"""Transfusion in PyTorch: next-token prediction on text and flow matching on any number of
continuous modalities, in one transformer over one interleaved sequence."""

from .losses import LossBreakdown
from .model import Transfusion
from .printing import print_modality_sample

__all__ = ['Transfusion', 'LossBreakdown', 'print_modality_sample']
