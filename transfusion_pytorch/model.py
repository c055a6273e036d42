"""Transfusion: one transformer, next-token prediction on text and flow matching on modalities
(Zhou et al., "Transfusion", 2024, https://arxiv.org/abs/2408.11039, with diffusion replaced
by flow matching).

The forward pass, in order:

    inputs (contract forms)  --inputs.py-->   samples of Text / Modality segments
    samples                  --packing.py-->  PackedBatch (flat tokens + per-token ids)
    PackedBatch              --masks.py-->    AttentionLayout, built once per batch
    noise each modality at its own time t, embed text ids and noised latents
    Transformer              --transformer.py--> hidden states
    text head at text targets, velocity heads at latent tokens --losses.py--> loss

Initialisation lives in `_init_weights`; the adaLN-zero and U-ViT skip projections set their
own starting values where they are made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flow
from .compat import PublicNames
from .config import TransfusionConfig, per_type
from .embeddings import OutputHead, TokenEmbedding
from .guidance import drop_text_conditions, without_eos_after_modality
from .inputs import Modality, ModalitySpec, Sample, Text, check_text, describe, modality_batch, normalize_samples, text_batch
from .losses import LossBreakdown, at_least_float32, combine, flow_loss_per_token, mean_or_zero, text_loss_per_token
from .masks import build_layout
from .packing import PackedBatch, pack
from .pre_post import PrePost
from .transformer import Transformer
from .vocab import Vocab


CLEAN_OUTPUT_MIN_REMAINING_TIME = 0.05


@dataclass
class Prediction:
    hidden: Tensor                      # (N, dim) hidden states
    noised: tuple[Tensor, ...]          # per type, (R_m, dim_latent) noised latent rows x_t
    row_times: tuple[Tensor, ...]       # per type, (R_m, 1) time of each row
    velocities: tuple[Tensor, ...]      # per type, (R_m, dim_latent) predicted velocities


class AxialPositions(nn.Module):
    """A learned embedding of a token's coordinate on each axis of its modality's grid, summed
    over the axes. Each axis has a small MLP of the coordinate, so any grid size works."""

    def __init__(self, num_axes: int, dim: int):
        super().__init__()
        self.axes = nn.ModuleList([nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim)) for _ in range(num_axes)])

    def forward(self, coords: Tensor) -> Tensor:
        """(N, num_axes) integer coordinates -> (N, dim)"""
        return sum(mlp(coords[:, axis:axis + 1].to(mlp[0].weight.dtype)) for axis, mlp in enumerate(self.axes))


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

    def encode_modality(self, modality_type: int, raw: Tensor) -> Tensor:
        """Runs the modality's encoder (if any) on one raw modality, without gradient."""
        encoder = self.modality_encoders[modality_type]
        if isinstance(encoder, nn.Identity):
            return raw
        with torch.no_grad():
            return encoder(raw[None])[0]

    def token_shape(self, modality_type: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The grid of tokens that a latent of `shape` takes in the sequence."""
        pre_post = self.pre_post[modality_type]
        return shape if isinstance(pre_post, nn.Identity) else pre_post.token_shape(shape)

    def num_modality_tokens(self, modality_type: int, shape: tuple[int, ...]) -> int:
        return math.prod(self.token_shape(modality_type, tuple(shape)))

    def to_samples(self, modalities, modality_type: int | None = None) -> tuple[list[Sample], bool]:
        """The contract's input forms -> (samples, whether they are framed by SOS / EOS)."""
        if torch.is_tensor(modalities) and not modalities.is_floating_point():
            return text_batch(modalities, self.config.num_text_tokens), False
        if torch.is_tensor(modalities):
            samples = modality_batch(modalities, modality_type, self.specs, self.encode_modality)
        else:
            samples = normalize_samples(modalities, self.config.num_text_tokens, self.specs, self.encode_modality)
        return [[self.with_token_shape(segment) for segment in sample] for sample in samples], True

    def with_token_shape(self, segment):
        if not isinstance(segment, Modality) or isinstance(self.pre_post[segment.modality_type], nn.Identity):
            return segment
        return replace(segment, token_shape = self.token_shape(segment.modality_type, segment.shape))

    def pack(self, modalities, modality_type: int | None = None, prob_uncond: float = 0.) -> PackedBatch:
        """With `prob_uncond > 0`, samples are replaced by their unconditional versions at that rate
        (condition dropout for classifier-free guidance, see `guidance.py`)."""
        samples, wrap = self.to_samples(modalities, modality_type)
        if not (prob_uncond > 0 and wrap):
            return pack(samples, self.vocab, wrap = wrap, latent_dtype = self.latent_dtype).to(self.device)
        samples, dropped = drop_text_conditions(samples, prob_uncond)
        packed = pack(samples, self.vocab, latent_dtype = self.latent_dtype)
        return without_eos_after_modality(packed, samples, dropped).to(self.device)

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype every latent is packed in, whatever it was given in: float32, or float64 in a
        float64 model. One rule per model, so a sample's loss never depends on the dtypes of the
        others in its batch; float32 in a bf16 / fp16 model too, because the noise, the path, the
        target and the flow loss are computed in float32 there anyway (`losses.at_least_float32`)."""
        return torch.float64 if self.token_embed.weight.dtype == torch.float64 else torch.float32

    # times and noise

    def span_times(
        self, packed: PackedBatch,
        times: Tensor | None = None,
        num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """(S,) the time of each modality span: from `times` (B, max modalities per sample),
        from `num_modalities_to_times_fn(num_modalities: (B,)) -> (B, max)`, or drawn from
        `time_distribution` (logit-normal by default, or uniform) on [0, 1], mapped onto
        [min_time_before_text, 1] for a modality that text follows. Transfusion
        (Zhou et al., 2024, section 4.3) limits the noise of an image that precedes its caption
        to half the schedule, so that the caption is learnt from a picture it can still see."""
        if times is None and num_modalities_to_times_fn is not None:
            num_modalities = torch.zeros(packed.batch_size, dtype = torch.long, device = self.device).index_add(
                0, packed.span_doc, torch.ones_like(packed.span_doc))
            times = num_modalities_to_times_fn(num_modalities)

        if times is None:
            config = self.config
            times = flow.training_times(packed.num_spans, config.time_distribution, config.time_logit_mean, config.time_logit_std,
                                        device = self.device)
            low = self.config.min_time_before_text
            return torch.where(packed.span_before_text, low + (1. - low) * times, times) if low > 0 else times

        times = torch.as_tensor(times, dtype = torch.float32, device = self.device)
        most = int(packed.span_rank.max()) + 1 if packed.num_spans > 0 else 0
        if times.ndim != 2 or times.shape[0] != packed.batch_size or times.shape[1] < most:
            raise ValueError(f'`times` must have shape (batch, max modalities per sample) = ({packed.batch_size}, >= {most}), got {tuple(times.shape)}')
        span_times = times[packed.span_doc, packed.span_rank]
        outside = ~((span_times >= 0) & (span_times <= 1))          # NaN compares false: it is outside too
        if outside.any():
            span = int(outside.nonzero()[0])
            doc, rank = int(packed.span_doc[span]), int(packed.span_rank[span])
            raise ValueError(f'`times` must lie in [0, 1] (0 is noise, 1 is data), got {float(span_times[span])} at times[{doc}, {rank}]')
        return span_times

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
        prob_uncond = (self.config.prob_uncond if self.training else 0.) if prob_uncond is None else prob_uncond
        packed = self.pack(modalities, modality_type, prob_uncond = prob_uncond)
        span_times = self.span_times(packed, times, num_modalities_to_times_fn)
        noise = tuple(torch.randn_like(latents, dtype = torch.float32) for latents in packed.latents)

        breakdown = self.compute_loss(
            packed, span_times, noise,
            ema_model = velocity_consistency_ema_model, delta_time = velocity_consistency_delta_time,
        )
        return (breakdown.total, breakdown) if return_breakdown else breakdown.total

    def text_logits(self, text: Tensor) -> Tensor:
        """(b, n) raw text rows, as `model(text)` trains them (no SOS / EOS) -> (b, n, vocab size)
        logits: position i predicts token i + 1."""
        if not torch.is_tensor(text) or text.is_floating_point() or text.ndim != 2 or text.numel() == 0:
            raise ValueError(f'`modalities`: return_loss = False takes Int[b n] text rows (b, n > 0), got {describe(text)}')
        samples = [[Text(row)] for row in check_text(text, self.config.num_text_tokens, '`modalities`')]
        packed = pack(samples, self.vocab, wrap = False).to(self.device)
        hidden = self.hidden_states(packed, packed.latents, torch.ones(0, device = self.device))
        return self.to_logits(hidden).view(*text.shape, -1)

    def spans_of_type(self, packed: PackedBatch, modality_type: int) -> list:
        return [record for record in packed.span_records if record.modality_type == modality_type]

    def embed(self, packed: PackedBatch, noised: tuple[Tensor, ...]) -> Tensor:
        """(N, dim): token embeddings, with the noised latents projected in at latent tokens."""
        x = self.token_embed(packed.tokens)
        for m, (latents, index) in enumerate(zip(noised, packed.latent_index)):
            if index.numel() == 0:
                continue
            shapes = [record.shape for record in self.spans_of_type(packed, m)] if self.uses_pre_post(m) else None
            tokens = self.latents_to_tokens(m, latents, shapes)
            if self.config.add_pos_emb[m]:
                tokens = tokens + self.pos_embs[m](packed.latent_coords[m])
            x = x.index_put((index,), tokens.to(x.dtype))     # bf16 under CPU autocast
        return x

    def uses_pre_post(self, modality_type: int) -> bool:
        return not isinstance(self.pre_post[modality_type], nn.Identity)

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
        """The model's output rows -> velocity rows. With `model_output_clean` the output is the
        clean latent x1, and v = (x1 - x_t) / (1 - t), with 1 - t kept above 0.05 (Li & He,
        "Back to Basics: Let Denoising Generative Models Denoise", 2025)."""
        if not self.config.model_output_clean:
            return output
        return (output - noised) / (1. - times).clamp(min = CLEAN_OUTPUT_MIN_REMAINING_TIME)

    def hidden_states(self, packed: PackedBatch, noised: tuple[Tensor, ...], span_times: Tensor) -> Tensor:
        use_flex = self.config.transformer.use_flex_attn
        use_flex = self.device.type == 'cuda' if use_flex is None else use_flex
        layout = build_layout(packed, use_flex_attn = use_flex, pad_to_multiple = self.pad_to_multiple)
        num_latent = sum(record.length for record in packed.span_records)
        return self.transformer(self.embed(packed, noised), layout, packed.position, span_times, packed.span, num_latent = num_latent)

    def predict(self, packed: PackedBatch, span_times: Tensor, noise: tuple[Tensor, ...]) -> Prediction:
        """Runs the model on a batch whose modalities are noised with `noise` at `span_times`."""
        row_times = tuple(span_times[rows][:, None] for rows in packed.latent_span)              # (R_m, 1)
        noised = tuple(flow.interpolate(n, x1, t) for n, x1, t in zip(noise, packed.latents, row_times))

        hidden = self.hidden_states(packed, noised, span_times)

        velocities = []
        for m, (index, x_t, t) in enumerate(zip(packed.latent_index, noised, row_times)):
            if index.numel() == 0:
                velocities.append(x_t)
                continue
            shapes = [record.shape for record in self.spans_of_type(packed, m)] if self.uses_pre_post(m) else None
            output = self.tokens_to_output(m, hidden[index], shapes)
            velocities.append(self.output_to_velocity(at_least_float32(output), x_t, t))

        return Prediction(hidden, noised, row_times, tuple(velocities))

    def compute_loss(
        self, packed: PackedBatch, span_times: Tensor, noise: tuple[Tensor, ...],
        ema_model: nn.Module | None = None, delta_time: float = 1e-3,
    ) -> LossBreakdown:
        """The loss for given times and noise: deterministic, for tests and custom training loops."""
        prediction = self.predict(packed, span_times, noise)
        hidden = prediction.hidden

        text_index = packed.text_index
        text_losses = text_loss_per_token(self.to_logits(hidden[text_index]), packed.text_target[text_index])

        targets = tuple(flow.velocity_target(n, x1) for n, x1 in zip(noise, packed.latents))
        flow_losses = tuple(flow_loss_per_token(v, target) for v, target in zip(prediction.velocities, targets))
        row_docs = tuple(packed.span_doc[rows] for rows in packed.latent_span)

        breakdown = combine(
            text_losses, packed.doc[text_index], flow_losses, row_docs,
            packed.batch_size, self.config.text_loss_weight, self.config.flow_loss_weight,
        )

        if ema_model is not None:
            consistency = self.velocity_consistency_losses(packed, span_times, noise, prediction, ema_model, delta_time)
            breakdown.velocity_consistency = consistency
            breakdown.total = breakdown.total + self.config.velocity_consistency_loss_weight * sum(consistency)

        if self.config.reconstruction_loss_weight > 0:
            reconstruction = self.reconstruction_losses(packed, prediction)
            breakdown.reconstruction = reconstruction
            breakdown.total = breakdown.total + self.config.reconstruction_loss_weight * sum(reconstruction)

        return breakdown

    # auxiliary losses

    def velocity_consistency_losses(self, packed, span_times, noise, prediction, ema_model, delta_time) -> tuple[Tensor, ...]:
        """Consistency flow matching (Yang et al., 2024): the velocity at (x_t, t) should match
        the EMA model's at (x_{t + dt}, t + dt) on the same straight path. The EMA side is a
        fixed target; the gradient flows through this model's velocity."""
        ema_model = getattr(ema_model, 'ema_model', ema_model)      # an `EMA` wrapper or a plain model
        later_times = (span_times + delta_time).clamp(max = 1.)
        with torch.no_grad():
            ema_velocities = ema_model.predict(packed, later_times, noise).velocities
        return tuple(
            mean_or_zero(flow_loss_per_token(v, target))
            for v, target in zip(prediction.velocities, ema_velocities)
        )

    def reconstruction_losses(self, packed: PackedBatch, prediction: Prediction) -> tuple[Tensor, ...]:
        """The predicted clean latent x1 = x_t + (1 - t) v, decoded, against the modality as it
        was given (before its encoder), or against the decoded clean latent where the type has no
        encoder. One mean-squared error per modality type, averaged over its modalities."""
        losses = []
        for m in range(self.num_modality_types):
            records = self.spans_of_type(packed, m)
            if len(records) == 0:
                losses.append(prediction.hidden.new_zeros(()))
                continue

            x_t, t, v = prediction.noised[m], prediction.row_times[m], prediction.velocities[m]
            predicted_clean = x_t + (1. - t) * v
            span_ids = [index for index, record in enumerate(packed.span_records) if record.modality_type == m]

            offset, per_modality = 0, []
            for span_id, record in zip(span_ids, records):
                rows = math.prod(record.shape)
                decoded = self.decode_latent(m, predicted_clean[offset:offset + rows].reshape(*record.shape, -1))
                target = self.reconstruction_target(m, packed, span_id, packed.latents[m][offset:offset + rows].reshape(*record.shape, -1))
                per_modality.append(F.mse_loss(decoded.float(), target.float()))
                offset += rows
            losses.append(torch.stack(per_modality).mean())
        return tuple(losses)

    def decode_latent(self, modality_type: int, latent: Tensor) -> Tensor:
        """(*shape, dim_latent) channel-last latent -> the decoder's output, in the user's layout."""
        if self.config.channel_first_latent[modality_type]:
            latent = latent.movedim(-1, 0)
        decoder = self.modality_decoders[modality_type]
        return latent if isinstance(decoder, nn.Identity) else decoder(latent[None])[0]

    def reconstruction_target(self, modality_type: int, packed: PackedBatch, span_id: int, clean: Tensor) -> Tensor:
        raw = packed.raw[span_id] if span_id < len(packed.raw) else None
        if raw is not None and not isinstance(self.modality_encoders[modality_type], nn.Identity):
            return raw.to(self.device)
        with torch.no_grad():
            return self.decode_latent(modality_type, clean)

    # generation (see generation.py)

    def sample(self, prompt = None, **kwargs) -> list:
        """One sample in the list form training takes, or a list of them for a list of prompts
        (each a list) or `batch_size=`. Options: `generation.SampleOptions` and `generation.sample_prompts`."""
        from .generation import SampleOptions, check_options, sample, sample_prompts
        check_options('sample', kwargs, sample, sample_prompts, SampleOptions)
        return sample(self, prompt, **kwargs)

    def sample_one(self, prompt = None, **kwargs) -> list:
        """One sample from one prompt (the public package's name; `sample` with one prompt)."""
        from .generation import SampleOptions, check_options, sample_prompts
        check_options('sample_one', kwargs, sample_prompts, SampleOptions)
        return sample_prompts(self, [prompt], ['prompt'], **kwargs)[0]

    def sample_many(self, prompts = None, **kwargs) -> list:
        """One sample per element of the list `prompts`, each a prompt in any form (the public package's name)."""
        from .generation import SampleOptions, check_options, sample_many, sample_prompts
        check_options('sample_many', kwargs, sample_prompts, SampleOptions)
        return sample_many(self, prompts, **kwargs)

    def generate_text_only(self, prompt: Tensor, seq_len: int, **kwargs) -> Tensor:
        """Continues `Int[b n]` raw text rows to `seq_len` tokens; returns the new `Int[b, seq_len - n]`."""
        from .generation import check_options, generate_text_only
        check_options('generate_text_only', kwargs, generate_text_only)
        return generate_text_only(self, prompt, seq_len, **kwargs)

    def generate_modality_only(self, **kwargs) -> Tensor:
        """A batch of modalities generated alone; see `generation.generate_modality_only`."""
        from .generation import check_options, generate_modality_only
        check_options('generate_modality_only', kwargs, generate_modality_only)
        return generate_modality_only(self, **kwargs)

    # saving, loading and weight averaging (see pretrained.py and ema.py)

    def save_pretrained(self, directory, **kwargs):
        """Writes config.json, model.safetensors and, with encoders / decoders, codecs.pt; see `pretrained.py`."""
        from .pretrained import save_pretrained
        return save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> Transfusion:
        """A model written by `save_pretrained`; see `pretrained.from_pretrained` for the options."""
        from .pretrained import from_pretrained
        return from_pretrained(cls, directory, **kwargs)

    # starting from a pretrained language model (see language_models.py)

    @classmethod
    def from_language_model(cls, path_or_model, **kwargs) -> Transfusion:
        """A model whose transformer, embedding and text head are a Hugging Face causal LM's (a
        folder written by `save_pretrained`, or a loaded model); see `language_models.from_language_model`."""
        from .language_models import from_language_model
        return from_language_model(cls, path_or_model, **kwargs)

    def save_language_model(self, directory, **kwargs):
        """Writes the text weights in the Hugging Face layout; see `language_models.save_language_model`."""
        from .language_models import save_language_model
        return save_language_model(self, directory, **kwargs)

    def create_ema(self, beta: float = 0.99):
        """An `ema.EMA` of this model's weights; call its `update()` after each optimizer step."""
        from .ema import EMA
        return EMA(self, beta)
