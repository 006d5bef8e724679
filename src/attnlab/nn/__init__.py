"""``nn.Module`` layers: projections around an op, plus the mechanisms that own parameters."""

from types import ModuleType as _ModuleType

from attnlab.nn.attention import Attention

# One block of imports per mechanism family below (separate blocks keep edits to different families apart).
# --- Mechanisms I: linear and recurrent family ---
# isort: split
from attnlab.nn.agent import AgentAttention
from attnlab.nn.lightnet import LightNetAttention, lrpe_theta, md_lrpe, md_lrpe_angles
from attnlab.nn.tnl import TNLAttention

# --- Mechanisms II: local, sparse and biased ---
# isort: split
from attnlab.nn.dynamic_mask import DynamicMaskAttention

# isort: split
# --- Mechanisms III: head routing, similarity forms, tensor attention ---
from attnlab.nn.additive import AdditiveAttentionPooling
from attnlab.nn.crosslmm import PooledVisualCrossAttention, merge_visual_tokens
from attnlab.nn.csa import ClassSemanticsAttention
from attnlab.nn.dcal import GlobalLocalCrossAttention, PairwiseCrossAttention, attention_rollout
from attnlab.nn.deconstructed import DeconstructedAttention, deconstructed_layer_inputs, variant_layers
from attnlab.nn.expert import ExpertAttention, PrunedAttention
from attnlab.nn.gaussian_adaptive import (
    GaussianAdaptiveAttention,
    GaussianAdaptiveMixer,
    MultiHeadGaussianAdaptiveAttention,
    gaussian_adaptive_weights,
)
from attnlab.nn.lama import LowRankAttentionPooling, lama_layer_inputs
from attnlab.nn.minimal import MinimalAttention, MinimalBlock
from attnlab.nn.moda import DuplexAlignmentAttention
from attnlab.nn.moh import MoHAttention, MoHGates, moh_load_balance_loss
from attnlab.nn.ninformer import MixerBlock, MixerFeedForward, MixerGatingUnit, NiNBlock
from attnlab.nn.probe import EfficientProbe
from attnlab.nn.rcmha import RCMHA, DepthwiseCausalConv
from attnlab.nn.segvg import TripleAlignmentAttention
from attnlab.nn.tensor import TensorAttention

__all__ = [name for name, value in dict(globals()).items()
           if not name.startswith("_") and not isinstance(value, _ModuleType)]
