//! The FLUX.1 MMDiT (diffusers `FluxTransformer2DModel`): dual-stream blocks with joint attention
//! over separate image and text weights, then single-stream blocks over the concatenated sequence.
//!
//! Weights are looked up once at load by their diffusers names; the forward mirrors diffusers op
//! for op (same dtypes, same order), and asks the cache hooks before every interceptable module.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::FluxTransformerConfig;
use super::embeddings::{rope, TimeTextEmbedding};
use crate::dit::hooks::{
    hooked_attention, resolve, AttentionId, AttentionRole, BlockId, ForwardContext, ModuleCounts,
    StepStats, StreamRoles, Tensors, TransformerHooks,
};
use crate::models::nn::{apply_rotary_emb, attention, FeedForward, Linear, Rope};
use crate::models::weights::Weights;
use crate::models::{ModelError, Result};

/// `eps` of every LayerNorm and QK RMSNorm in FLUX.
const NORM_EPS: f64 = 1e-6;

/// `int(dim * mlp_ratio)` with FLUX's `mlp_ratio = 4`.
const MLP_RATIO: i64 = 4;

/// `nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)`.
fn layer_norm(x: &Tensor) -> Tensor {
    let dim = *x.size().last().expect("layer_norm of a 0-d tensor");
    x.layer_norm([dim], None::<Tensor>, None::<Tensor>, NORM_EPS, true)
}

/// `torch.nn.RMSNorm(head_dim, eps=1e-6)` over the last dim of `[B, S, H, head_dim]`.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, dim: i64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm(self.weight.size(), Some(&self.weight), NORM_EPS)
    }
}

/// The AdaLN modulation `linear(silu(temb))` split into `chunks` vectors of width `dim`
/// (`AdaLayerNormZero`: 6, `AdaLayerNormZeroSingle`: 3, `AdaLayerNormContinuous`: 2).
#[derive(Debug)]
struct Modulation {
    linear: Linear,
    chunks: i64,
}

impl Modulation {
    fn load(w: &Weights, prefix: &str, dim: i64, chunks: i64) -> Result<Self> {
        Ok(Self {
            linear: Linear::load(w, &format!("{prefix}.linear"), dim, chunks * dim)?,
            chunks,
        })
    }

    /// `temb [B, D]` -> `chunks` tensors `[B, D]`.
    fn forward(&self, temb: &Tensor) -> Vec<Tensor> {
        self.linear.forward(&temb.silu()).chunk(self.chunks, 1)
    }
}

/// `norm(x) * (1 + scale[:, None]) + shift[:, None]`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    layer_norm(x) * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// The text-stream half of a dual block's joint attention.
#[derive(Debug)]
struct AddedProjections {
    add_q_proj: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    to_add_out: Linear,
}

/// Which of a FLUX block's tensors is which stream: both block kinds take and return
/// `(encoder_hidden_states, hidden_states)` (diffusers' `TransformerBlockRegistry` entries for
/// `FluxTransformerBlock` and `FluxSingleTransformerBlock`).
const STREAMS: StreamRoles = StreamRoles {
    hidden: 1,
    text: Some(0),
};

/// The two kinds of FLUX blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// `transformer_blocks.i`: separate image and text streams, joint attention.
    Dual,
    /// `single_transformer_blocks.i`: one stream over [text; image].
    Single,
}

/// diffusers `FluxAttention` with `FluxAttnProcessor`: QK RMSNorm per head, RoPE, SDPA.
#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// `to_out.0`; absent in single blocks (`pre_only`), whose `proj_out` follows instead.
    to_out: Option<Linear>,
    added: Option<AddedProjections>,
    head_dim: i64,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, dim: i64, head_dim: i64, dual: bool) -> Result<Self> {
        let linear = |name: &str| Linear::load(w, &format!("{prefix}.{name}"), dim, dim);
        let norm = |name: &str| RmsNorm::load(w, &format!("{prefix}.{name}"), head_dim);
        let (to_out, added) = if dual {
            let added = AddedProjections {
                add_q_proj: linear("add_q_proj")?,
                add_k_proj: linear("add_k_proj")?,
                add_v_proj: linear("add_v_proj")?,
                norm_added_q: norm("norm_added_q")?,
                norm_added_k: norm("norm_added_k")?,
                to_add_out: linear("to_add_out")?,
            };
            (Some(linear("to_out.0")?), Some(added))
        } else {
            (None, None)
        };
        Ok(Self {
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            to_out,
            added,
            head_dim,
        })
    }

    /// `[B, S, D]` -> `[B, S, H, head_dim]`.
    fn heads(&self, x: Tensor) -> Tensor {
        x.unflatten(-1, [-1, self.head_dim])
    }

    /// RoPE on q and k, then SDPA over `[B, S, H, Dh]` inputs; returns `[B, S, D]`.
    fn attend(&self, q: Tensor, k: Tensor, v: Tensor, rope: &Rope) -> Tensor {
        let q = apply_rotary_emb(&q, rope);
        let k = apply_rotary_emb(&k, rope);
        attention(&q, &k, &v).to_kind(q.kind())
    }

    /// Joint attention of a dual block: image `[B, L_img, D]` and text `[B, L_txt, D]` streams,
    /// concatenated text first, attended together, split and projected back per stream; returns
    /// `[image, text]` as diffusers' `FluxAttention` does.
    fn forward_joint(&self, hidden: &Tensor, encoder: &Tensor, rope: &Rope) -> Tensors {
        let added = self
            .added
            .as_ref()
            .expect("joint attention without added projections");
        let q = self.norm_q.forward(&self.heads(self.to_q.forward(hidden)));
        let k = self.norm_k.forward(&self.heads(self.to_k.forward(hidden)));
        let v = self.heads(self.to_v.forward(hidden));
        let eq = added
            .norm_added_q
            .forward(&self.heads(added.add_q_proj.forward(encoder)));
        let ek = added
            .norm_added_k
            .forward(&self.heads(added.add_k_proj.forward(encoder)));
        let ev = self.heads(added.add_v_proj.forward(encoder));
        let out = self.attend(
            Tensor::cat(&[eq, q], 1),
            Tensor::cat(&[ek, k], 1),
            Tensor::cat(&[ev, v], 1),
            rope,
        );
        let l_txt = encoder.size()[1];
        let l_img = out.size()[1] - l_txt;
        let parts = out.split_with_sizes([l_txt, l_img], 1);
        let to_out = self
            .to_out
            .as_ref()
            .expect("joint attention without to_out");
        Tensors(vec![
            to_out.forward(&parts[1].contiguous()),
            added.to_add_out.forward(&parts[0].contiguous()),
        ])
    }

    /// Self-attention of a single block over `[B, L_txt + L_img, D]`, without output projection.
    fn forward_single(&self, x: &Tensor, rope: &Rope) -> Tensors {
        let q = self.norm_q.forward(&self.heads(self.to_q.forward(x)));
        let k = self.norm_k.forward(&self.heads(self.to_k.forward(x)));
        let v = self.heads(self.to_v.forward(x));
        Tensors(vec![self.attend(q, k, v, rope)])
    }
}

/// The hooks' names for one block and its attention module.
#[derive(Debug)]
struct BlockIds {
    kind: BlockKind,
    /// Index within its kind's list.
    index: usize,
    block: BlockId,
    attention: AttentionId,
}

/// diffusers `FluxTransformerBlock` (`transformer_blocks.i`).
#[derive(Debug)]
struct DualBlock {
    norm1: Modulation,
    norm1_context: Modulation,
    attn: Attention,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DualBlock {
    fn load(w: &Weights, prefix: &str, c: &FluxTransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        Ok(Self {
            norm1: Modulation::load(w, &format!("{prefix}.norm1"), dim, 6)?,
            norm1_context: Modulation::load(w, &format!("{prefix}.norm1_context"), dim, 6)?,
            attn: Attention::load(
                w,
                &format!("{prefix}.attn"),
                dim,
                c.attention_head_dim,
                true,
            )?,
            ff: FeedForward::load(w, &format!("{prefix}.ff"), dim, MLP_RATIO * dim)?,
            ff_context: FeedForward::load(
                w,
                &format!("{prefix}.ff_context"),
                dim,
                MLP_RATIO * dim,
            )?,
        })
    }

    fn forward(
        &self,
        id: &AttentionId,
        io: &Tensors,
        temb: &Tensor,
        rope: &Rope,
        hooks: &mut dyn TransformerHooks,
        attention_counts: &mut ModuleCounts,
    ) -> Tensors {
        let (io_hidden, io_encoder) = streams(io);
        // AdaLayerNormZero chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let m = self.norm1.forward(temb);
        let c = self.norm1_context.forward(temb);
        let norm_hidden = modulate(io_hidden, &m[0], &m[1]);
        let norm_encoder = modulate(io_encoder, &c[0], &c[1]);
        let attn = hooked_attention(id, hooks, attention_counts, || {
            self.attn.forward_joint(&norm_hidden, &norm_encoder, rope)
        });
        assert_eq!(
            attn.len(),
            2,
            "{}: joint attention gives two outputs",
            id.path
        );
        let (attn_hidden, attn_encoder) = (&attn[0], &attn[1]);

        let hidden = io_hidden + m[2].unsqueeze(1) * attn_hidden;
        let ff = self.ff.forward(&modulate(&hidden, &m[3], &m[4]));
        let hidden = hidden + m[5].unsqueeze(1) * ff;

        let encoder = io_encoder + c[2].unsqueeze(1) * attn_encoder;
        let ff = self.ff_context.forward(&modulate(&encoder, &c[3], &c[4]));
        let encoder = clip_f16(encoder + c[5].unsqueeze(1) * ff);
        block_io(hidden, encoder)
    }
}

/// diffusers `FluxSingleTransformerBlock` (`single_transformer_blocks.i`): attention and MLP in
/// parallel over `[text; image]`, fused by one output projection.
#[derive(Debug)]
struct SingleBlock {
    norm: Modulation,
    proj_mlp: Linear,
    proj_out: Linear,
    attn: Attention,
}

impl SingleBlock {
    fn load(w: &Weights, prefix: &str, c: &FluxTransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        let mlp = MLP_RATIO * dim;
        Ok(Self {
            norm: Modulation::load(w, &format!("{prefix}.norm"), dim, 3)?,
            proj_mlp: Linear::load(w, &format!("{prefix}.proj_mlp"), dim, mlp)?,
            // Input: [attention output (dim) | MLP hidden (4·dim)].
            proj_out: Linear::load(w, &format!("{prefix}.proj_out"), dim + mlp, dim)?,
            attn: Attention::load(
                w,
                &format!("{prefix}.attn"),
                dim,
                c.attention_head_dim,
                false,
            )?,
        })
    }

    fn forward(
        &self,
        id: &AttentionId,
        io: &Tensors,
        temb: &Tensor,
        rope: &Rope,
        hooks: &mut dyn TransformerHooks,
        attention_counts: &mut ModuleCounts,
    ) -> Tensors {
        let (io_hidden, io_encoder) = streams(io);
        let l_txt = io_encoder.size()[1];
        let residual = Tensor::cat(&[io_encoder, io_hidden], 1);
        // AdaLayerNormZeroSingle chunks: shift_msa, scale_msa, gate_msa.
        let m = self.norm.forward(temb);
        let norm = modulate(&residual, &m[0], &m[1]);
        let mlp = self.proj_mlp.forward(&norm).gelu("tanh");
        let attn = hooked_attention(id, hooks, attention_counts, || {
            self.attn.forward_single(&norm, rope)
        });
        assert_eq!(
            attn.len(),
            1,
            "{}: single-stream attention gives one output",
            id.path
        );
        let out = m[2].unsqueeze(1) * self.proj_out.forward(&Tensor::cat(&[&attn[0], &mlp], 2));
        let out = clip_f16(residual + out);
        let l_img = out.size()[1] - l_txt;
        block_io(out.narrow(1, l_txt, l_img), out.narrow(1, 0, l_txt))
    }
}

/// `(hidden, encoder)` of a block's tensors (see [`STREAMS`]).
fn streams(io: &Tensors) -> (&Tensor, &Tensor) {
    let text = STREAMS.text.expect("FLUX blocks carry a text stream");
    (&io[STREAMS.hidden], &io[text])
}

/// A block's tensors from its image and text streams, in [`STREAMS`] order.
fn block_io(hidden: Tensor, encoder: Tensor) -> Tensors {
    Tensors(vec![encoder, hidden])
}

/// diffusers clips f16 block outputs to the finite range to keep inf out of the residual stream.
fn clip_f16(x: Tensor) -> Tensor {
    if x.kind() == Kind::Half {
        x.clip(-65504.0, 65504.0)
    } else {
        x
    }
}

/// A loaded FLUX transformer.
#[derive(Debug)]
pub struct FluxTransformer {
    config: FluxTransformerConfig,
    /// Latent patch tokens `[B, L_img, in_ch]` -> `[B, L_img, D]`.
    x_embedder: Linear,
    /// T5 tokens `[B, L_txt, joint_dim]` -> `[B, L_txt, D]`.
    context_embedder: Linear,
    time_text_embed: TimeTextEmbedding,
    dual_blocks: Vec<DualBlock>,
    single_blocks: Vec<SingleBlock>,
    /// Every block in run order (dual, then single), as the hooks name it.
    ids: Vec<BlockIds>,
    /// `norm_out` (`AdaLayerNormContinuous`): chunks are scale then shift.
    norm_out: Modulation,
    /// `[B, L_img, D]` -> `[B, L_img, patch² · out_ch]`.
    proj_out: Linear,
    device: Device,
    kind: Kind,
}

impl FluxTransformer {
    /// Loads a diffusers `transformer/` folder: `config.json` and (sharded) safetensors.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = FluxTransformerConfig::load(&config_path)?;
        let w = Weights::from_dir(dir, device, kind)?;
        check_block_counts(&w, &config, &config_path)?;
        let dim = config.inner_dim();
        let dual_blocks = (0..config.num_layers)
            .map(|i| DualBlock::load(&w, &format!("transformer_blocks.{i}"), &config))
            .collect::<Result<_>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::load(&w, &format!("single_transformer_blocks.{i}"), &config))
            .collect::<Result<_>>()?;
        let ids = block_ids(config.num_layers, config.num_single_layers);
        Ok(Self {
            ids,
            x_embedder: Linear::load(&w, "x_embedder", config.in_channels, dim)?,
            context_embedder: Linear::load(
                &w,
                "context_embedder",
                config.joint_attention_dim,
                dim,
            )?,
            time_text_embed: TimeTextEmbedding::load(
                &w,
                "time_text_embed",
                dim,
                config.pooled_projection_dim,
                config.guidance_embeds,
            )?,
            dual_blocks,
            single_blocks,
            norm_out: Modulation::load(&w, "norm_out", dim, 2)?,
            proj_out: Linear::load(&w, "proj_out", dim, config.output_dim())?,
            config,
            device,
            kind,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &FluxTransformerConfig {
        &self.config
    }

    /// Dual plus single blocks: the length of the flattened block order the hooks see.
    pub fn num_blocks(&self) -> usize {
        self.dual_blocks.len() + self.single_blocks.len()
    }

    /// Device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Dtype the weights (and the computation) are in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Estimated transformer FLOPs (2 per multiply-add) of one step whose forwards each ran
    /// `batch` samples of `image_tokens` + `text_tokens` tokens, and the part the cache saved.
    /// Every forward costs the whole block stack; a forward that did not run saves all of it, and
    /// inside the forwards that ran, each block or attention module that did not run saves what
    /// [`compute`](Self::compute) costed it at ([`StepStats::macs_not_run`]).
    pub fn step_flops(
        &self,
        batch: i64,
        image_tokens: i64,
        text_tokens: i64,
        stats: &StepStats,
    ) -> (f64, f64) {
        let c = &self.config;
        let blocks = [
            (BlockKind::Dual, c.num_layers),
            (BlockKind::Single, c.num_single_layers),
        ];
        let per_forward: f64 = batch as f64
            * blocks
                .iter()
                .map(|&(kind, n)| n as f64 * block_macs(c, kind, image_tokens, text_tokens))
                .sum::<f64>();
        let total = 2.0 * f64::from(stats.forwards.total()) * per_forward;
        let saved =
            2.0 * (f64::from(stats.forwards.not_computed()) * per_forward + stats.macs_not_run);
        (total, saved.min(total))
    }

    /// One transformer evaluation (one CFG branch of one step), returning the velocity
    /// `[B, L_img, patch² · out_ch]`.
    ///
    /// `timestep` is `[B]` in 0..1 (the pipeline passes `t / 1000`), `guidance` is `[B]` (the raw
    /// guidance scale, only for guidance-distilled models), `img_ids [L_img, 3]` and
    /// `txt_ids [L_txt, 3]` (a leading batch dim is accepted and dropped, as diffusers does).
    /// Every module the hooks can intercept is routed through them, and every decision is
    /// recorded in `stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        ctx: &ForwardContext,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> Tensor {
        stats.note_forward_start(ctx);
        let decision = hooks.before_forward(ctx);
        // A copy, so that the closure below can borrow `stats` for the inner modules.
        let forwards_before = stats.forwards;
        let mut forwards = forwards_before;
        let (out, computed) = resolve(decision, &mut forwards, || {
            let inputs = ForwardInputs {
                hidden_states,
                encoder_hidden_states,
                pooled_projections,
                timestep,
                guidance,
                img_ids,
                txt_ids,
            };
            self.compute(&inputs, hooks, stats)
        });
        stats.forwards = forwards;
        stats.note_forward(&forwards_before);
        if computed {
            hooks.after_forward(ctx, &out);
        }
        out
    }

    fn compute(
        &self,
        x: &ForwardInputs,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> Tensor {
        let hidden = self.x_embedder.forward(x.hidden_states);
        let dtype = hidden.kind();
        let timestep = x.timestep.to_kind(dtype) * 1000.0;
        let guidance = x.guidance.map(|g| g.to_kind(dtype) * 1000.0);
        let temb = self
            .time_text_embed
            .forward(&timestep, guidance.as_ref(), x.pooled_projections);
        let encoder = self.context_embedder.forward(x.encoder_hidden_states);

        let unbatch = |ids: &Tensor| {
            if ids.dim() == 3 {
                ids.get(0)
            } else {
                ids.shallow_clone()
            }
        };
        let ids = Tensor::cat(&[unbatch(x.txt_ids), unbatch(x.img_ids)], 0);
        let rope = rope(&ids, &self.config.axes_dims_rope);

        // Blocks and their attention are costed at this forward's shapes.
        let (batch, l_img, l_txt) = (hidden.size()[0] as f64, hidden.size()[1], encoder.size()[1]);
        let mut io = block_io(hidden, encoder);
        for ids in &self.ids {
            let (id, attn) = (&ids.block, &ids.attention);
            let (blocks_before, attention_before) = (stats.blocks, stats.attention);
            let decision = hooks.before_block(id, &io);
            let attention = &mut stats.attention;
            let (out, computed) =
                resolve(decision, &mut stats.blocks, || match ids.kind {
                    BlockKind::Dual => self.dual_blocks[ids.index]
                        .forward(attn, &io, &temb, &rope, hooks, attention),
                    BlockKind::Single => self.single_blocks[ids.index]
                        .forward(attn, &io, &temb, &rope, hooks, attention),
                });
            let c = &self.config;
            stats.macs_not_run += batch
                * if computed {
                    let not_run = stats.attention.since(&attention_before).not_computed();
                    f64::from(not_run) * attention_macs(c, ids.kind, l_img, l_txt)
                } else {
                    block_macs(c, ids.kind, l_img, l_txt)
                };
            stats.note_block(&blocks_before, &attention_before);
            if computed {
                hooks.after_block(id, &io, &out);
            }
            io = out;
        }
        let (hidden, _) = streams(&io);

        let decision = hooks.before_output_projection();
        let projection_before = stats.output_projection;
        let (out, computed) = resolve(decision, &mut stats.output_projection, || {
            // AdaLayerNormContinuous: linear(silu(temb)) -> (scale, shift).
            let m = self.norm_out.forward(&temb);
            self.proj_out.forward(&modulate(hidden, &m[1], &m[0]))
        });
        stats.note_output_projection(&projection_before);
        if computed {
            hooks.after_output_projection(&out);
        }
        out
    }
}

/// Multiply-adds of one `kind` block's attention module for one sample of `l_img` image and
/// `l_txt` text tokens, as [`Attention`] runs it: q, k and v for every token (`to_q/k/v` on the
/// image tokens; in dual blocks `add_q/k/v_proj` on the text tokens), `QKᵀ` and `AV` over the
/// joint sequence, and, in dual blocks only, the output projections (`to_out.0` on the image
/// tokens, `to_add_out` on the text tokens). A single block's fused `proj_out` runs outside its
/// attention module: [`block_macs`] counts it. Norms, RoPE and softmax are elementwise, left out.
pub fn attention_macs(c: &FluxTransformerConfig, kind: BlockKind, l_img: i64, l_txt: i64) -> f64 {
    let d = c.inner_dim() as f64;
    let l = (l_img + l_txt) as f64;
    let projections = match kind {
        BlockKind::Dual => 4.0,
        BlockKind::Single => 3.0,
    };
    projections * l * d * d + 2.0 * l * l * d
}

/// Multiply-adds of one `kind` block for one sample (see [`attention_macs`]): its attention plus,
/// in a dual block, the `norm1` and `norm1_context` modulations (D → 6D each, once per sample)
/// and the MLPs `ff` on the image tokens and `ff_context` on the text tokens (D → 4D → D); in a
/// single block, the `norm` modulation (D → 3D), `proj_mlp` (D → 4D) and the fused `proj_out`
/// over `[attention | MLP]` (5D → D) on every token.
pub fn block_macs(c: &FluxTransformerConfig, kind: BlockKind, l_img: i64, l_txt: i64) -> f64 {
    let d = c.inner_dim() as f64;
    let l = (l_img + l_txt) as f64;
    let mlp = MLP_RATIO as f64;
    let rest = match kind {
        BlockKind::Dual => 2.0 * 6.0 * d * d + l * 2.0 * mlp * d * d,
        BlockKind::Single => 3.0 * d * d + l * (mlp + (1.0 + mlp)) * d * d,
    };
    attention_macs(c, kind, l_img, l_txt) + rest
}

/// diffusers' module paths of `dual` joint-attention blocks then `single` single-stream blocks;
/// every attention module is spatial self-attention in diffusers' classification.
fn block_ids(dual: usize, single: usize) -> Vec<BlockIds> {
    let num_blocks = dual + single;
    let kinds = (0..dual)
        .map(|i| (BlockKind::Dual, i, format!("transformer_blocks.{i}")))
        .chain((0..single).map(|i| {
            (
                BlockKind::Single,
                i,
                format!("single_transformer_blocks.{i}"),
            )
        }));
    kinds
        .enumerate()
        .map(|(position, (kind, index, path))| BlockIds {
            kind,
            index,
            attention: AttentionId {
                path: format!("{path}.attn"),
                role: AttentionRole::Spatial,
                index: position,
            },
            block: BlockId {
                path,
                index: position,
                num_blocks,
                streams: STREAMS,
            },
        })
        .collect()
}

/// The tensors of one forward, bundled to keep signatures short.
struct ForwardInputs<'a> {
    hidden_states: &'a Tensor,
    encoder_hidden_states: &'a Tensor,
    pooled_projections: &'a Tensor,
    timestep: &'a Tensor,
    guidance: Option<&'a Tensor>,
    img_ids: &'a Tensor,
    txt_ids: &'a Tensor,
}

/// Catches a config that describes fewer blocks (or no guidance embedder) than the weights hold:
/// loading would otherwise succeed and silently run a truncated model.
fn check_block_counts(w: &Weights, c: &FluxTransformerConfig, config_path: &Path) -> Result<()> {
    let extra = [
        (
            "num_layers",
            format!("transformer_blocks.{}.norm1.linear.weight", c.num_layers),
        ),
        (
            "num_single_layers",
            format!(
                "single_transformer_blocks.{}.norm.linear.weight",
                c.num_single_layers
            ),
        ),
    ];
    for (key, name) in extra {
        if w.contains(&name) {
            return Err(ModelError::config(
                config_path,
                key,
                format!(
                    "the weights in {} have more blocks (found `{name}`)",
                    w.path().display()
                ),
            ));
        }
    }
    let guidance = "time_text_embed.guidance_embedder.linear_1.weight";
    if !c.guidance_embeds && w.contains(guidance) {
        return Err(ModelError::config(
            config_path,
            "guidance_embeds",
            format!(
                "false, but the weights in {} have `{guidance}`",
                w.path().display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_match_a_hand_count() {
        // D = 8 (one head of 8); one sample of 4 image + 2 text tokens (L = 6).
        let c: FluxTransformerConfig =
            serde_json::from_str(r#"{"num_attention_heads": 1, "attention_head_dim": 8}"#).unwrap();
        // Dual attention: to_q, to_k, to_v on 4 image tokens 3·4·8·8 = 768; add_q/k/v_proj on 2
        // text tokens 3·2·8·8 = 384; QKᵀ 6·6·8 = 288; AV 288; to_out.0 4·8·8 = 256; to_add_out
        // 2·8·8 = 128. Total 2112.
        assert_eq!(attention_macs(&c, BlockKind::Dual, 4, 2), 2112.0);
        // Dual block: + norm1 and norm1_context 2·8·48 = 768; ff 4·(8·32 + 32·8) = 2048;
        // ff_context 2·(8·32 + 32·8) = 1024. Total 2112 + 3840 = 5952.
        assert_eq!(block_macs(&c, BlockKind::Dual, 4, 2), 5952.0);
        // Single attention: to_q, to_k, to_v on 6 tokens 3·6·8·8 = 1152; QKᵀ 288; AV 288; no
        // output projection. Total 1728.
        assert_eq!(attention_macs(&c, BlockKind::Single, 4, 2), 1728.0);
        // Single block: + norm 8·24 = 192; proj_mlp 6·8·32 = 1536; proj_out 6·40·8 = 1920.
        // Total 1728 + 3648 = 5376.
        assert_eq!(block_macs(&c, BlockKind::Single, 4, 2), 5376.0);
    }
}
