"""Attention variants. Each obeys the contract in :mod:`attnlab.attention.base`."""

from attnlab.attention.base import Attention, QKVAttention
from attnlab.attention.linear import LinearAttention
from attnlab.attention.softmax import SoftmaxAttention
from attnlab.attention.synthesizer import SynthesizerAttention
from attnlab.attention.talking_heads import TalkingHeadsAttention

__all__ = [
    "Attention",
    "QKVAttention",
    "LinearAttention",
    "SoftmaxAttention",
    "SynthesizerAttention",
    "TalkingHeadsAttention",
]
