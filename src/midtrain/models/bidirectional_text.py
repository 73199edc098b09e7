"""A bidirectional text encoder (BERT) as a VLM's language model, with a decoder's output contract.

The demo featurizer puts all-MiniLM-L6-v2 (a ``BertModel``) inside a LLaVA shell. LLaVA's
``forward`` hands whatever its language model returns to its own output class, and which
fields a ``BertModel`` output carries (``pooler_output``, ``cross_attentions``, ...) is not a
contract: transformers 5.24 started passing the whole output on (``**outputs``) and the
pooler output broke it. This subclass pins the contract instead of depending on it:

- no pooling layer (a VLM pools its own last hidden state);
- no cache: an encoder attends both ways, so any ``cache`` / ``past_key_values`` /
  ``use_cache`` the shell passes is dropped;
- the output is exactly ``BaseModelOutputWithPast(last_hidden_state, hidden_states,
  attentions)``, the fields every decoder language model of a VLM returns.

The weights are ``BertModel``'s, key for key, so a MiniLM state dict loads into it unchanged.
Registered with the Auto classes as ``midtrain_bidirectional_text`` by
:func:`midtrain.models.components.register_components`, which model loading calls.
"""

from __future__ import annotations

from transformers import BertConfig, BertModel
from transformers.modeling_outputs import BaseModelOutputWithPast

MODEL_TYPE = "midtrain_bidirectional_text"
_DECODER_ONLY_KWARGS = ("cache", "past_key_values", "use_cache", "cache_position", "logits_to_keep")


class BidirectionalTextConfig(BertConfig):
    model_type = MODEL_TYPE


class BidirectionalTextModel(BertModel):
    config_class = BidirectionalTextConfig

    def __init__(self, config: BidirectionalTextConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        for key in _DECODER_ONLY_KWARGS:
            kwargs.pop(key, None)
        kwargs.pop("return_dict", None)
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )  # fmt: skip
        return BaseModelOutputWithPast(
            last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states, attentions=out.attentions
        )
