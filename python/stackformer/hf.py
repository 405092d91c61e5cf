"""Hugging Face `transformers` wrappers (optional: needs torch and transformers).

    import stackformer as sf
    from stackformer.hf import StackformerForCausalLM

    hf = StackformerForCausalLM.from_stackformer(model)      # same config and weights
    hf.save_pretrained("my-model")                            # config.json + model.safetensors
    again = StackformerForCausalLM.from_pretrained("my-model")  # a local folder; no hub
    model2 = again.to_stackformer()                           # back to sf.Model, same logits

`StackformerConfig` (model_type "stackformer") keeps the whole `sf.Config` as a dict under
`stackformer`, so every wiring and knob round-trips; importing this module registers both
classes with `AutoConfig` / `AutoModelForCausalLM`. The model is `stackformer.torch`'s
`TorchModel` (same parameter names under `model.`), its forward follows the causal-LM
conventions of transformers: `forward(input_ids, attention_mask=None, labels=None)` returns a
`CausalLMOutput` whose loss (when labels are given) is the mean cross-entropy of logits[:, :-1]
against labels[:, 1:], ignoring -100 -- what `sf.Model.forward_backward(x[:, :-1], x[:, 1:])`
computes for labels = input_ids.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

try:
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput
except ImportError as e:  # pragma: no cover - exercised only without the optional packages
    raise ImportError("stackformer.hf needs torch and transformers "
                      "(pip install torch transformers)") from e

from .config import Config
from .torch import TorchModel, from_torch, to_torch


class StackformerConfig(PretrainedConfig):
    """A transformers config holding a stackformer `Config` (as its dict) under `stackformer`."""

    model_type = "stackformer"

    def __init__(self, stackformer: Optional[Dict[str, Any]] = None, **kwargs: Any):
        sf_cfg = Config.from_dict(dict(stackformer)) if stackformer else Config()
        self.stackformer = sf_cfg.to_dict()
        kwargs.setdefault("vocab_size", sf_cfg.vocab_size)
        kwargs.setdefault("hidden_size", sf_cfg.d_model)
        kwargs.setdefault("num_hidden_layers", sf_cfg.n_layers)
        kwargs.setdefault("num_attention_heads", sf_cfg.n_heads)
        kwargs.setdefault("max_position_embeddings", sf_cfg.max_seq_len)
        # TorchModel ties inside (its head is tok_emb.weight itself): nothing for transformers to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def to_stackformer(self) -> Config:
        """The stackformer Config this config holds (validated)."""
        return Config.from_saved_dict(dict(self.stackformer))


class StackformerForCausalLM(PreTrainedModel):
    """stackformer's model as a transformers causal LM (weights in `self.model`, a TorchModel)."""

    config_class = StackformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: StackformerConfig):
        super().__init__(config)
        self.model = TorchModel(config.to_stackformer())
        self.post_init()

    def _init_weights(self, module) -> None:
        """TorchModel initialises its own parameters (stackformer's init distribution)."""

    def get_input_embeddings(self):
        return self.model.tok_emb

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                return_dict: Optional[bool] = None, **kwargs: Any):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        logits = self.model(x, key_padding_mask=attention_mask)
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutput(loss=loss, logits=logits)

    @classmethod
    def from_stackformer(cls, model) -> "StackformerForCausalLM":
        """The wrapper with the config and weights of an `sf.Model`."""
        out = cls(StackformerConfig(stackformer=model.config.to_dict()))
        out.model.load_state_dict(to_torch(model).state_dict())
        return out

    def to_stackformer(self, seed: int = 0):
        """An `sf.Model` with this model's config and weights (cast to float32)."""
        return from_torch(self.model, seed=seed)


AutoConfig.register("stackformer", StackformerConfig, exist_ok=True)
AutoModelForCausalLM.register(StackformerConfig, StackformerForCausalLM, exist_ok=True)
