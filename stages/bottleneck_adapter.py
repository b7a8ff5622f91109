"""Houlsby-style bottleneck adapters (``peft.method: adapter``) after every decoder layer's attention and MLP:
``h + up(act(down(h)))``, ``up`` zero-initialised so the adapted model starts as the base.

Written here because neither library fits: peft has no bottleneck adapter, and AdapterHub's ``adapters``
1.3.0 requires ``transformers~=4.57.6`` (the stack pins 5.19). This file imports only torch, transformers and
safetensors, never rayalign: copy it next to your code to load a trained output::

    from bottleneck_adapter import load_adapted_model
    model = load_adapted_model("runs/tiny/sft/<fingerprint>/model")   # base + adapters, ready to run

A saved output folder holds ``bottleneck_adapter.safetensors`` (the adapters' weights only, keys
``layers.<i>.<attention|mlp>.<down|up>.<weight|bias>``), ``bottleneck_adapter.json`` (the base model's path
and the adapters' shape) and the base's ``config.json`` and tokenizer. A nonlinear adapter cannot be merged
into the base's weights, and the folder has no ``model.safetensors``, so plain ``from_pretrained`` on it
refuses to load rather than silently returning the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_NAME = "bottleneck_adapter.safetensors"
CONFIG_NAME = "bottleneck_adapter.json"
FORMAT = "rayalign-bottleneck-adapter/1"
PLACES = ("attention", "mlp")  # after the attention block's output projection, and after the MLP
ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}


class Bottleneck(torch.nn.Module):
    """``h + up(act(down(h)))``; ``up`` starts at zero, so the block starts as the identity."""

    def __init__(self, hidden_size: int, size: int, activation: str = "gelu"):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, size)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(size, hidden_size)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


def parameter_count(hidden_size: int, size: int, num_layers: int) -> int:
    """Trainable parameters the adapters add: per layer and place, down (h*s + s) and up (s*h + h)."""
    return num_layers * len(PLACES) * (2 * hidden_size * size + size + hidden_size)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (``model.model.layers`` of a Llama, Mistral or Qwen, causal LM or classifier)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(
            hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"peft.method adapter: {type(model).__name__} has no decoder layers with self_attn and mlp "
                         "(Llama-style models)")
    return layers


def _after(adapter: Bottleneck):
    """A forward hook that passes the block's output (the first item of a tuple) through ``adapter``."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)
    return hook


def add_adapters(model: torch.nn.Module, size: int, activation: str = "gelu") -> torch.nn.Module:
    """Add the adapters to ``model`` in place (submodules ``bottleneck_attention``/``bottleneck_mlp`` of each
    decoder layer, run by forward hooks), and make ``model.save_pretrained`` write the adapter folder."""
    hidden = model.config.hidden_size
    param = next(model.parameters())
    for layer in decoder_layers(model):
        for place, block in zip(PLACES, (layer.self_attn, layer.mlp)):
            adapter = Bottleneck(hidden, size, activation).to(device=param.device, dtype=param.dtype)
            layer.add_module(f"bottleneck_{place}", adapter)
            block.register_forward_hook(_after(adapter))
    model.bottleneck_config = {"format": FORMAT, "size": size, "activation": activation, "hidden_size": hidden,
                               "num_layers": len(decoder_layers(model)), "places": list(PLACES)}
    # The HF Trainer saves through the model's own save_pretrained (under ZeRO-3 with the gathered state dict).
    model.save_pretrained = lambda out_dir, state_dict=None, **_: save_adapters(model, out_dir, state_dict)
    return model


def adapter_state(model: torch.nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors under the saved names (``layers.<i>.<place>.<down|up>.<weight|bias>``)."""
    state = model.state_dict() if state_dict is None else state_dict
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        for j, part in enumerate(parts):
            if part.startswith("bottleneck_") and j >= 1 and parts[j - 1].isdigit():
                place = part.removeprefix("bottleneck_")
                out[".".join(["layers", parts[j - 1], place, *parts[j + 1:]])] = tensor.detach().contiguous().cpu()
    return out


def save_adapters(model: torch.nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write the adapter folder: the adapters' safetensors, their JSON config, and the base's config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model, state_dict)
    if not tensors:
        raise ValueError("no bottleneck adapters in the model's state dict")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {**model.bottleneck_config, "base_model_name_or_path": model.config._name_or_path}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    model.config.save_pretrained(str(out))
    return out


def load_adapted_model(adapter_dir: str | Path, base: str | Path | None = None, **from_pretrained_kwargs):
    """The base (``base``, else the path recorded at save time) with the saved adapters, as a causal LM."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{adapter_dir / CONFIG_NAME}: not a {FORMAT} config")
    from_pretrained_kwargs.setdefault("use_safetensors", True)
    model = AutoModelForCausalLM.from_pretrained(str(base or config["base_model_name_or_path"]),
                                                 **from_pretrained_kwargs)
    add_adapters(model, config["size"], config["activation"])
    saved = load_file(str(adapter_dir / WEIGHTS_NAME))
    layers = decoder_layers(model)
    expected = {f"layers.{i}.{place}.{p}" for i in range(len(layers)) for place in config["places"]
                for p in ("down.weight", "down.bias", "up.weight", "up.bias")}
    if set(saved) != expected:
        raise ValueError(f"{adapter_dir / WEIGHTS_NAME}: adapter tensors do not match the base's "
                         f"{len(layers)} layers (missing {sorted(expected - set(saved))[:3]}, "
                         f"unexpected {sorted(set(saved) - expected)[:3]})")
    with torch.no_grad():
        for key, tensor in saved.items():
            _, index, place, name = key.split(".", 3)
            target = getattr(layers[int(index)], f"bottleneck_{place}").get_parameter(name)
            target.copy_(tensor.to(target.dtype))
    return model
