"""Transfusion: one transformer, next-token prediction on text and flow matching on modalities
(Zhou et al., "Transfusion", 2024, https://arxiv.org/abs/2408.11039, with diffusion replaced
by flow matching).

The forward pass, in order:

    inputs (contract forms)  --inputs.py, latents.py-->  samples of Text / Modality segments
    samples                  --packing.py-->  PackedBatch (flat tokens + per-token ids)
    PackedBatch              --masks.py-->    AttentionLayout, built once per batch
    noise each modality at its own time t (objective.py), embed text ids and noised latents
    Transformer              --transformer.py--> hidden states
    text head at text targets, velocity heads at latent tokens --objective.py, losses.py--> loss

The class builds the modules, routes latents in and out of the transformer and delegates: the
objective to `objective.py`, the way from inputs to a packed batch to `latents.py`,
generation to `generation.py`, saving and loading to `pretrained.py` and `language_models.py`.
Initialisation lives in `_init_weights`; the adaLN-zero and U-ViT skip projections set their
own starting values where they are made.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from . import ema, generation, language_models, latents, objective, pretrained
from .compat import PublicNames
from .config import TransfusionConfig, per_type
from .embeddings import AxialPositions, OutputHead, TokenEmbedding
from .inputs import ModalitySpec, Sample
from .losses import LossBreakdown
from .masks import build_layout
from .packing import PackedBatch
from .pre_post import PrePost
from .transformer import Transformer
from .vocab import Vocab


def optional_modules(value, num_types: int, name: str) -> nn.ModuleList:
    modules = per_type(value, num_types, name, lambda v: v is None or isinstance(v, nn.Module), expected = 'a module or None')
    return nn.ModuleList([nn.Identity() if module is None else module for module in modules])


class Transfusion(PublicNames, nn.Module):
    # pad each packed batch up to a multiple of this many tokens for the transformer (None: no
    # padding). Set by `training.parallelize` for compiled blocks, so that batches of changing
    # length compile one graph; see `masks.py`
    pad_to_multiple: int | None = None

    def __init__(
        self,
        *,
        num_text_tokens: int,
        transformer: dict,
        dim_latent: int | tuple[int, ...] | None = None,
        channel_first_latent: bool | tuple[bool, ...] = False,
        add_pos_emb: bool | tuple[bool, ...] | None = None,
        modality_encoder: nn.Module | tuple[nn.Module | None, ...] | None = None,
        modality_decoder: nn.Module | tuple[nn.Module | None, ...] | None = None,
        pre_post_transformer_enc_dec: tuple[nn.Module, nn.Module] | tuple[tuple[nn.Module, nn.Module] | None, ...] | None = None,
        modality_default_shape: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None,
        modality_num_dim: int | tuple[int, ...] | None = None,
        fallback_to_default_shape_if_invalid: bool = True,
        text_loss_weight: float = 1.,
        flow_loss_weight: float | tuple[float, ...] = 1.,
        model_output_clean: bool = False,
        reconstruction_loss_weight: float = 0.,
        velocity_consistency_loss_weight: float = 0.1,
        prob_uncond: float = 0.1,
        min_time_before_text: float = 0.5,
        time_distribution: str = 'logit_normal',
        time_logit_mean: float = 0.,
        time_logit_std: float = 1.,
    ):
        super().__init__()

        self.config = config = TransfusionConfig.from_kwargs(
            num_text_tokens = num_text_tokens, transformer = transformer, dim_latent = dim_latent,
            channel_first_latent = channel_first_latent, add_pos_emb = add_pos_emb,
            modality_default_shape = modality_default_shape, modality_num_dim = modality_num_dim,
            fallback_to_default_shape_if_invalid = fallback_to_default_shape_if_invalid,
            text_loss_weight = text_loss_weight, flow_loss_weight = flow_loss_weight,
            model_output_clean = model_output_clean, reconstruction_loss_weight = reconstruction_loss_weight,
            velocity_consistency_loss_weight = velocity_consistency_loss_weight, prob_uncond = prob_uncond,
            min_time_before_text = min_time_before_text, time_distribution = time_distribution,
            time_logit_mean = time_logit_mean, time_logit_std = time_logit_std,
        )

        num_types, dim = config.num_modality_types, config.transformer.dim
        self.vocab = Vocab(num_text_tokens, num_types)
        self.specs = tuple(
            ModalitySpec(d, channel_first, num_dim)
            for d, channel_first, num_dim in zip(config.dim_latent, config.channel_first_latent, config.modality_num_dim)
        )

        # the encoders turn raw modalities into latents before noising; the decoders turn sampled
        # latents back. Both are fixed codecs: this model never trains them (the reconstruction
        # loss sends its gradient through the decoder, to the transformer), so their parameters
        # are frozen, and the encoders run in eval mode whatever the model's mode (`train`)
        self.modality_encoders = optional_modules(modality_encoder, num_types, 'modality_encoder').requires_grad_(False).eval()
        self.modality_decoders = optional_modules(modality_decoder, num_types, 'modality_decoder').requires_grad_(False)

        self.transformer = Transformer(config.transformer)

        # learned down / up blocks around the transformer (the paper's U-Net patch encoder) take
        # the place of the linear projections in and out of their modality type, which are then
        # not made (an Identity keeps the other types' indices, and so their state-dict keys)
        pre_post = PrePost.per_type(pre_post_transformer_enc_dec, config)
        linear_unless_pre_post = lambda m, make: nn.Identity() if isinstance(pre_post[m], PrePost) else make()

        # the text ids' rows frozen with the text weights; a head tied to the embedding (see embeddings.py)
        frozen_rows = num_text_tokens if config.transformer.freeze_text_weights else 0
        self.token_embed = TokenEmbedding(self.vocab.size, dim, num_frozen = frozen_rows)
        self.latent_to_model = nn.ModuleList([linear_unless_pre_post(m, lambda: nn.Linear(d, dim)) for m, d in enumerate(config.dim_latent)])
        self.model_to_velocity = nn.ModuleList([linear_unless_pre_post(m, lambda: nn.Linear(dim, d)) for m, d in enumerate(config.dim_latent)])
        self.pos_embs = nn.ModuleList([
            AxialPositions(num_dim, dim) if add else nn.Identity()
            for add, num_dim in zip(config.add_pos_emb, config.modality_num_dim)
        ])
        self.to_logits = OutputHead(dim, self.vocab.size, frozen_rows, tied = self.token_embed if config.transformer.tie_embeddings else None)
        self.pre_post = pre_post

        self._init_weights()

    def _init_weights(self):
        for module in (self.token_embed, self.to_logits, *self.latent_to_model, *self.model_to_velocity):
            if isinstance(module, nn.Identity):
                continue
            nn.init.normal_(module.weight, std = 0.02)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> Transfusion:
        """As `nn.Module.train`, but the modality encoders stay in eval mode: they are fixed
        codecs, and a BatchNorm in one must not update its running statistics in training."""
        super().train(mode)
        self.modality_encoders.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.token_embed.weight.device

    @property
    def num_modality_types(self) -> int:
        return self.config.num_modality_types

    # inputs -> packed batch

    def token_shape(self, modality_type: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The grid of tokens that a latent of `shape` takes in the sequence."""
        pre_post = self.pre_post[modality_type]
        return shape if isinstance(pre_post, nn.Identity) else pre_post.token_shape(shape)

    def num_modality_tokens(self, modality_type: int, shape: tuple[int, ...]) -> int:
        return math.prod(self.token_shape(modality_type, tuple(shape)))

    def to_samples(self, modalities, modality_type: int | None = None) -> tuple[list[Sample], bool]:
        """The contract's input forms -> (samples, whether they are framed by SOS / EOS); see `latents.py`."""
        return latents.to_samples(self, modalities, modality_type)

    def pack(self, modalities, modality_type: int | None = None, prob_uncond: float = 0.) -> PackedBatch:
        """A batch in any of the contract's forms -> a `PackedBatch` on the model's device, with
        condition dropout at the rate `prob_uncond`; see `latents.pack_batch`."""
        return latents.pack_batch(self, modalities, modality_type, prob_uncond)

    def decode_latent(self, modality_type: int, latent: Tensor) -> Tensor:
        """(*shape, dim_latent) channel-last latent -> the decoder's output, in the user's layout."""
        return latents.decoded(self, modality_type, latent)

    # the objective (see objective.py)

    def span_times(self, packed: PackedBatch, times: Tensor | None = None,
                   num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """(S,) the time of each modality span: given, or drawn; see `objective.span_times`."""
        return objective.span_times(self, packed, times, num_modalities_to_times_fn)

    def predict(self, packed: PackedBatch, span_times: Tensor, noise: tuple[Tensor, ...]) -> objective.Prediction:
        """Runs the model on a batch whose modalities are noised with `noise` at `span_times`."""
        return objective.predict(self, packed, span_times, noise)

    def compute_loss(self, packed: PackedBatch, span_times: Tensor, noise: tuple[Tensor, ...],
                     ema_model: nn.Module | None = None, delta_time: float = 1e-3) -> LossBreakdown:
        """The loss for given times and noise: deterministic, for tests and custom training loops."""
        return objective.compute_loss(self, packed, span_times, noise, ema_model, delta_time)

    # the forward pass

    def forward(
        self,
        modalities: list | Tensor,
        times: Tensor | None = None,
        num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None,
        modality_type: int | None = None,
        velocity_consistency_ema_model: nn.Module | None = None,
        velocity_consistency_delta_time: float = 1e-3,
        prob_uncond: float | None = None,
        return_breakdown: bool = False,
        return_loss: bool = True,
    ) -> Tensor | tuple[Tensor, LossBreakdown]:
        """The training loss of a batch in any of the contract's forms (see `inputs.py`).
        `prob_uncond` overrides the configured condition dropout, which applies in training mode only.
        With `return_loss = False`, `Int[b n]` text rows give their next-token logits instead,
        (b, n, vocab size), for evaluation and perplexity."""
        if not return_loss:
            return self.text_logits(modalities)
        breakdown = objective.training_loss(self, modalities, times, num_modalities_to_times_fn, modality_type,
                                            velocity_consistency_ema_model, velocity_consistency_delta_time, prob_uncond)
        return (breakdown.total, breakdown) if return_breakdown else breakdown.total

    def text_logits(self, text: Tensor) -> Tensor:
        """(b, n) raw text rows -> (b, n, vocab size) next-token logits; see `objective.text_logits`."""
        return objective.text_logits(self, text)

    def embed(self, packed: PackedBatch, noised: tuple[Tensor, ...]) -> Tensor:
        """(N, dim): token embeddings, with the noised latents projected in at latent tokens."""
        x = self.token_embed(packed.tokens)
        for m, (rows, index) in enumerate(zip(noised, packed.latent_index)):
            if index.numel() == 0:
                continue
            tokens = self.latents_to_tokens(m, rows, self.span_shapes(packed, m))
            if self.config.add_pos_emb[m]:
                tokens = tokens + self.pos_embs[m](packed.latent_coords[m])
            x = x.index_put((index,), tokens.to(x.dtype))     # bf16 under CPU autocast
        return x

    def uses_pre_post(self, modality_type: int) -> bool:
        return not isinstance(self.pre_post[modality_type], nn.Identity)

    def span_shapes(self, packed: PackedBatch, modality_type: int) -> list | None:
        """The shapes of the type's modalities in the batch, which its learned down / up blocks need; None without them."""
        return [record.shape for record in packed.spans_of_type(modality_type)] if self.uses_pre_post(modality_type) else None

    def latents_to_tokens(self, modality_type: int, rows: Tensor, shapes: list | None = None) -> Tensor:
        """(R, dim_latent) latent rows -> (N, dim) tokens; `shapes` are the shapes of the
        modalities the rows come from, needed by a learned down-sampler."""
        if not self.uses_pre_post(modality_type):
            return self.latent_to_model[modality_type](rows.to(self.token_embed.weight.dtype))
        return self.pre_post[modality_type].encode(rows, shapes)

    def tokens_to_output(self, modality_type: int, hidden: Tensor, shapes: list | None = None) -> Tensor:
        """(N, dim) hidden states at latent tokens -> (R, dim_latent) model output rows."""
        if not self.uses_pre_post(modality_type):
            return self.model_to_velocity[modality_type](hidden)
        return self.pre_post[modality_type].decode(hidden, shapes)

    def output_to_velocity(self, output: Tensor, noised: Tensor, times: Tensor) -> Tensor:
        """The model's output rows -> velocity rows (`model_output_clean`: see `objective.output_to_velocity`)."""
        return objective.output_to_velocity(self.config, output, noised, times)

    def hidden_states(self, packed: PackedBatch, noised: tuple[Tensor, ...], span_times: Tensor) -> Tensor:
        use_flex = self.config.transformer.use_flex_attn
        use_flex = self.device.type == 'cuda' if use_flex is None else use_flex
        layout = build_layout(packed, use_flex_attn = use_flex, pad_to_multiple = self.pad_to_multiple)
        num_latent = sum(record.length for record in packed.span_records)
        return self.transformer(self.embed(packed, noised), layout, packed.position, span_times, packed.span, num_latent = num_latent)

    # generation (see generation.py)

    def sample(self, prompt = None, **kwargs) -> list:
        """One sample in the list form training takes, or a list of them for a list of prompts
        (each a list) or `batch_size=`. Options: `generation.SampleOptions` and `generation.sample_prompts`."""
        generation.check_options('sample', kwargs, generation.sample, generation.sample_prompts, generation.SampleOptions)
        return generation.sample(self, prompt, **kwargs)

    def sample_one(self, prompt = None, **kwargs) -> list:
        """One sample from one prompt (the public package's name; `sample` with one prompt)."""
        generation.check_options('sample_one', kwargs, generation.sample_prompts, generation.SampleOptions)
        return generation.sample_prompts(self, [prompt], ['prompt'], **kwargs)[0]

    def sample_many(self, prompts = None, **kwargs) -> list:
        """One sample per element of the list `prompts`, each a prompt in any form (the public package's name)."""
        generation.check_options('sample_many', kwargs, generation.sample_prompts, generation.SampleOptions)
        return generation.sample_many(self, prompts, **kwargs)

    def generate_text_only(self, prompt: Tensor, seq_len: int, **kwargs) -> Tensor:
        """Continues `Int[b n]` raw text rows to `seq_len` tokens; returns the new `Int[b, seq_len - n]`."""
        generation.check_options('generate_text_only', kwargs, generation.generate_text_only)
        return generation.generate_text_only(self, prompt, seq_len, **kwargs)

    def generate_modality_only(self, **kwargs) -> Tensor:
        """A batch of modalities generated alone; see `generation.generate_modality_only`."""
        generation.check_options('generate_modality_only', kwargs, generation.generate_modality_only)
        return generation.generate_modality_only(self, **kwargs)

    # saving, loading and weight averaging (see pretrained.py and ema.py)

    def save_pretrained(self, directory, **kwargs):
        """Writes config.json, model.safetensors and, with encoders / decoders, codecs.pt; see `pretrained.py`."""
        return pretrained.save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> Transfusion:
        """A model written by `save_pretrained`; see `pretrained.from_pretrained` for the options."""
        return pretrained.from_pretrained(cls, directory, **kwargs)

    def create_ema(self, beta: float = 0.99) -> ema.EMA:
        """An `ema.EMA` of this model's weights; call its `update()` after each optimizer step."""
        return ema.EMA(self, beta)

    # starting from a pretrained language model (see language_models.py)

    @classmethod
    def from_language_model(cls, path_or_model, **kwargs) -> Transfusion:
        """A model whose transformer, embedding and text head are a Hugging Face causal LM's (a
        folder written by `save_pretrained`, or a loaded model); see `language_models.from_language_model`."""
        return language_models.from_language_model(cls, path_or_model, **kwargs)

    def save_language_model(self, directory, **kwargs):
        """Writes the text weights in the Hugging Face layout; see `language_models.save_language_model`."""
        return language_models.save_language_model(self, directory, **kwargs)
