//! The CogVideoX video transformer (diffusers `CogVideoXTransformer3DModel`): text and video
//! tokens concatenated `[text; video]`, blocks with expert AdaLN (one LayerNorm, separate
//! modulation for each modality), full 3D joint attention over both streams with one set of
//! weights, and a shared feed-forward.
//!
//! Weights are looked up once at load by their diffusers names; the forward mirrors diffusers op
//! for op, and asks the cache hooks before every interceptable module: the whole forward, each
//! `transformer_blocks.i`, its `attn1` (spatial self-attention in diffusers' classification) and
//! the output projection (`norm_final`, `norm_out`, `proj_out`).
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::CogVideoXTransformerConfig;
use super::embeddings::{rotary_tables, sincos_table, PatchEmbed};
use crate::dit::hooks::{
    hooked_attention, resolve, AttentionId, AttentionRole, BlockId, ForwardContext, ModuleCounts,
    StepStats, StreamRoles, Tensors, TransformerHooks,
};
use crate::models::nn::{
    apply_rotary_emb, attention, timestep_projection, FeedForward, LayerNorm, Linear, Rope,
    TimestepEmbedding,
};
use crate::models::weights::Weights;
use crate::models::{ModelError, Result};

/// A CogVideoX block takes and returns `(hidden_states, encoder_hidden_states)` (diffusers'
/// `TransformerBlockRegistry` entry for `CogVideoXBlock`).
const STREAMS: StreamRoles = StreamRoles {
    hidden: 0,
    text: Some(1),
};

/// `eps` of the q/k LayerNorms.
const QK_NORM_EPS: f64 = 1e-6;

/// The feed-forward's hidden width: `4 · dim`.
const MLP_RATIO: i64 = 4;

/// How token positions enter the model, prepared once per latent size.
#[derive(Debug)]
pub enum Positions {
    /// 2b: `[1, L_txt + N, D]` added to the embedded `[text; video]` tokens.
    SinCos(Tensor),
    /// 5b / 1.5: rotary tables for the video tokens' queries and keys.
    Rope(Rope),
}

/// `CogVideoXLayerNormZero`: `linear(silu(temb))` into (shift, scale, gate) for the video stream
/// and the same for the text stream, over one shared LayerNorm.
#[derive(Debug)]
struct ExpertNorm {
    linear: Linear,
    norm: LayerNorm,
}

/// One stream normalised and modulated, with its gate `[B, 1, D]`.
struct Modulated {
    hidden: Tensor,
    hidden_gate: Tensor,
    text: Tensor,
    text_gate: Tensor,
}

impl ExpertNorm {
    fn load(w: &Weights, prefix: &str, c: &CogVideoXTransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        Ok(Self {
            linear: Linear::load(w, &format!("{prefix}.linear"), c.time_embed_dim, 6 * dim)?,
            norm: LayerNorm::load_with_affine(
                w,
                &format!("{prefix}.norm"),
                dim,
                c.norm_eps,
                c.norm_elementwise_affine,
            )?,
        })
    }

    fn forward(&self, hidden: &Tensor, text: &Tensor, temb: &Tensor) -> Modulated {
        let m = self.linear.forward(&temb.silu()).chunk(6, 1);
        let modulate = |x: &Tensor, shift: &Tensor, scale: &Tensor| {
            self.norm.forward(x) * (scale + 1.0).unsqueeze(1) + shift.unsqueeze(1)
        };
        Modulated {
            hidden: modulate(hidden, &m[0], &m[1]),
            hidden_gate: m[2].unsqueeze(1),
            text: modulate(text, &m[3], &m[4]),
            text_gate: m[5].unsqueeze(1),
        }
    }
}

/// `Attention` with `CogVideoXAttnProcessor2_0`: one q/k/v over `[text; video]`, LayerNorm on
/// q and k per head, RoPE on the video queries and keys only, SDPA, `to_out.0`.
#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: LayerNorm,
    norm_k: LayerNorm,
    to_out: Linear,
    head_dim: i64,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, c: &CogVideoXTransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        let bias = c.attention_bias;
        let linear = |name: &str, b: bool| {
            Linear::load_with_bias(w, &format!("{prefix}.{name}"), dim, dim, b)
        };
        let norm = |name: &str| {
            LayerNorm::load(
                w,
                &format!("{prefix}.{name}"),
                c.attention_head_dim,
                QK_NORM_EPS,
            )
        };
        Ok(Self {
            to_q: linear("to_q", bias)?,
            to_k: linear("to_k", bias)?,
            to_v: linear("to_v", bias)?,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            // The block's `attention_out_bias` default: CogVideoX passes none.
            to_out: linear("to_out.0", true)?,
            head_dim: c.attention_head_dim,
        })
    }

    /// `hidden [B, N, D]`, `text [B, L, D]` -> `[hidden, text]` attention outputs.
    fn forward(&self, hidden: &Tensor, text: &Tensor, rope: Option<&Rope>) -> Tensors {
        let l_txt = text.size()[1];
        let x = Tensor::cat(&[text, hidden], 1);
        let heads = |t: Tensor| t.unflatten(-1, [-1, self.head_dim]); // [B, S, H, Dh]
        let q = self.norm_q.forward(&heads(self.to_q.forward(&x)));
        let k = self.norm_k.forward(&heads(self.to_k.forward(&x)));
        let v = heads(self.to_v.forward(&x));
        let (q, k) = match rope {
            Some(rope) => {
                let rotate = |t: &Tensor| {
                    let n = t.size()[1] - l_txt;
                    Tensor::cat(
                        &[
                            t.narrow(1, 0, l_txt),
                            apply_rotary_emb(&t.narrow(1, l_txt, n), rope),
                        ],
                        1,
                    )
                };
                (rotate(&q), rotate(&k))
            }
            None => (q, k),
        };
        let out = self.to_out.forward(&attention(&q, &k, &v));
        let n = out.size()[1] - l_txt;
        Tensors(vec![out.narrow(1, l_txt, n), out.narrow(1, 0, l_txt)])
    }
}

/// diffusers `CogVideoXBlock` (`transformer_blocks.i`).
#[derive(Debug)]
struct Block {
    norm1: ExpertNorm,
    attn1: Attention,
    norm2: ExpertNorm,
    ff: FeedForward,
}

impl Block {
    fn load(w: &Weights, prefix: &str, c: &CogVideoXTransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        Ok(Self {
            norm1: ExpertNorm::load(w, &format!("{prefix}.norm1"), c)?,
            attn1: Attention::load(w, &format!("{prefix}.attn1"), c)?,
            norm2: ExpertNorm::load(w, &format!("{prefix}.norm2"), c)?,
            ff: FeedForward::load(w, &format!("{prefix}.ff"), dim, MLP_RATIO * dim)?,
        })
    }

    fn forward(
        &self,
        id: &AttentionId,
        io: &Tensors,
        temb: &Tensor,
        rope: Option<&Rope>,
        hooks: &mut dyn TransformerHooks,
        attention_counts: &mut ModuleCounts,
    ) -> Tensors {
        let (hidden, text) = (&io[0], &io[1]);
        let l_txt = text.size()[1];
        let n1 = self.norm1.forward(hidden, text, temb);
        let attn = hooked_attention(id, hooks, attention_counts, || {
            self.attn1.forward(&n1.hidden, &n1.text, rope)
        });
        assert_eq!(attn.len(), 2, "{}: attention gives two outputs", id.path);
        let hidden = hidden + &n1.hidden_gate * &attn[0];
        let text = text + &n1.text_gate * &attn[1];

        let n2 = self.norm2.forward(&hidden, &text, temb);
        let ff = self.ff.forward(&Tensor::cat(&[&n2.text, &n2.hidden], 1));
        let n = ff.size()[1] - l_txt;
        let hidden = hidden + n2.hidden_gate * ff.narrow(1, l_txt, n);
        let text = text + n2.text_gate * ff.narrow(1, 0, l_txt);
        Tensors(vec![hidden, text])
    }
}

/// The hooks' names for one block and its attention module.
#[derive(Debug)]
struct BlockIds {
    block: BlockId,
    attention: AttentionId,
}

/// A loaded CogVideoX transformer.
#[derive(Debug)]
pub struct CogVideoXTransformer {
    config: CogVideoXTransformerConfig,
    patch_embed: PatchEmbed,
    /// `time_embedding`: the projected timestep `[B, D]` -> `[B, time_embed_dim]`.
    time_embedding: TimestepEmbedding,
    blocks: Vec<Block>,
    ids: Vec<BlockIds>,
    norm_final: LayerNorm,
    /// `norm_out` (`AdaLayerNorm`, `chunk_dim=1`): shift then scale.
    norm_out_linear: Linear,
    norm_out: LayerNorm,
    /// `[B, N, D]` -> `[B, N, p_t·p²·out]`.
    proj_out: Linear,
    device: Device,
    kind: Kind,
}

impl CogVideoXTransformer {
    /// Loads a diffusers `transformer/` folder: `config.json` and (sharded) safetensors.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_path = dir.join("config.json");
        let c = CogVideoXTransformerConfig::load(&config_path)?;
        let w = Weights::from_dir(dir, device, kind)?;
        let extra = format!("transformer_blocks.{}.norm1.linear.weight", c.num_layers);
        if w.contains(&extra) {
            return Err(ModelError::config(
                &config_path,
                "num_layers",
                format!(
                    "the weights in {} have more blocks (found `{extra}`)",
                    w.path().display()
                ),
            ));
        }
        let dim = c.inner_dim();
        let blocks = (0..c.num_layers)
            .map(|i| Block::load(&w, &format!("transformer_blocks.{i}"), &c))
            .collect::<Result<_>>()?;
        let ids = (0..c.num_layers)
            .map(|i| BlockIds {
                block: BlockId {
                    path: format!("transformer_blocks.{i}"),
                    index: i,
                    num_blocks: c.num_layers,
                    streams: STREAMS,
                },
                attention: AttentionId {
                    path: format!("transformer_blocks.{i}.attn1"),
                    role: AttentionRole::Spatial,
                    index: i,
                },
            })
            .collect();
        let affine = c.norm_elementwise_affine;
        Ok(Self {
            patch_embed: PatchEmbed::load(&w, "patch_embed", &c)?,
            time_embedding: TimestepEmbedding::load(&w, "time_embedding", dim, c.time_embed_dim)?,
            blocks,
            ids,
            norm_final: LayerNorm::load_with_affine(&w, "norm_final", dim, c.norm_eps, affine)?,
            norm_out_linear: Linear::load(&w, "norm_out.linear", c.time_embed_dim, 2 * dim)?,
            norm_out: LayerNorm::load_with_affine(&w, "norm_out.norm", dim, c.norm_eps, affine)?,
            proj_out: Linear::load(&w, "proj_out", dim, c.output_dim())?,
            config: c,
            device,
            kind,
        })
    }

    pub fn config(&self) -> &CogVideoXTransformerConfig {
        &self.config
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Estimated FLOPs (2 per multiply-add) of one step of samples of `tokens` tokens, and the
    /// part the cache saved. `stats.forwards` counts one forward per sample (CFG half, also when
    /// both halves ran in one batched call): each costs the whole block stack, one that did not
    /// run (e.g. a rebuilt unconditional half) saves all of it, and inside the forwards that ran,
    /// each block or attention module that did not run saves what [`compute`](Self::compute)
    /// costed it at ([`StepStats::macs_not_run`]).
    pub fn step_flops(&self, tokens: i64, stats: &StepStats) -> (f64, f64) {
        let per_forward = self.num_blocks() as f64 * block_macs(&self.config, tokens);
        let total = 2.0 * f64::from(stats.forwards.total()) * per_forward;
        let saved =
            2.0 * (f64::from(stats.forwards.not_computed()) * per_forward + stats.macs_not_run);
        (total, saved.min(total))
    }

    /// The positions of a latent of `frames × height × width` (latent pixels) with `text_tokens`
    /// text tokens. The 2b's sin-cos table is laid out for exactly `max_text_seq_length` text
    /// tokens (diffusers fails on any other count): refused here naming the field.
    pub fn positions(
        &self,
        (frames, height, width): (i64, i64, i64),
        text_tokens: i64,
    ) -> Result<Positions> {
        let c = &self.config;
        let p = c.patch_size;
        if height % p != 0 || width % p != 0 {
            return Err(ModelError::invalid_input(
                "height",
                format!("the latent size {height}x{width} is not a multiple of the patch size {p}"),
            ));
        }
        if c.use_rotary_positional_embeddings {
            Ok(Positions::Rope(rotary_tables(
                c,
                (frames, height, width),
                self.device,
            )))
        } else if text_tokens != c.max_text_seq_length {
            Err(ModelError::invalid_input(
                "max_sequence_length",
                format!(
                    "this model's positions are laid out for exactly {} text tokens, got {text_tokens}",
                    c.max_text_seq_length
                ),
            ))
        } else {
            Ok(Positions::SinCos(sincos_table(
                c,
                (frames, height, width),
                self.device,
                self.kind,
            )))
        }
    }

    /// One transformer evaluation of `hidden_states [B, F, C, H, W]` with `encoder_hidden_states
    /// [B, L, text_dim]` at `timestep [B]` (0..1000), returning the prediction `[B, F, C, H, W]`.
    /// Every module the hooks can intercept is routed through them and every decision is
    /// recorded in `stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep: &Tensor,
        positions: &Positions,
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
            self.compute(
                hidden_states,
                encoder_hidden_states,
                timestep,
                positions,
                hooks,
                stats,
            )
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
        video: &Tensor,
        text: &Tensor,
        timestep: &Tensor,
        positions: &Positions,
        hooks: &mut dyn TransformerHooks,
        stats: &mut StepStats,
    ) -> Tensor {
        let (b, f, _, h, w) = video.size5().expect("video latents are [B, F, C, H, W]");
        let dtype = video.kind();
        let t_emb = timestep_projection(timestep, self.config.inner_dim()).to_kind(dtype);
        let temb = self.time_embedding.forward(&t_emb); // [B, time_embed_dim]

        let tokens = self.patch_embed.forward(text, video); // [B, L + N, D]
        let kind = tokens.kind();
        let (tokens, rope) = match positions {
            Positions::SinCos(table) => (tokens + table.to_kind(kind), None),
            Positions::Rope(rope) => (tokens, Some(rope)),
        };
        let l_txt = text.size()[1];
        let n = tokens.size()[1] - l_txt;
        let mut io = Tensors(vec![tokens.narrow(1, l_txt, n), tokens.narrow(1, 0, l_txt)]);

        // What a block and its attention cost on this forward's `b` samples (both CFG halves of
        // a batched forward, or the conditional one alone).
        let block_cost = b as f64 * block_macs(&self.config, l_txt + n);
        let attention_cost = b as f64 * attention_macs(&self.config, l_txt + n);
        for (ids, block) in self.ids.iter().zip(&self.blocks) {
            let (blocks_before, attention_before) = (stats.blocks, stats.attention);
            let decision = hooks.before_block(&ids.block, &io);
            let attention = &mut stats.attention;
            let (out, computed) = resolve(decision, &mut stats.blocks, || {
                block.forward(&ids.attention, &io, &temb, rope, hooks, attention)
            });
            stats.macs_not_run += if computed {
                let not_run = stats.attention.since(&attention_before).not_computed();
                f64::from(not_run) * attention_cost
            } else {
                block_cost
            };
            stats.note_block(&blocks_before, &attention_before);
            if computed {
                hooks.after_block(&ids.block, &io, &out);
            }
            io = out;
        }

        let hidden = &io[STREAMS.hidden];
        let decision = hooks.before_output_projection();
        let projection_before = stats.output_projection;
        let (out, computed) = resolve(decision, &mut stats.output_projection, || {
            let x = self.norm_final.forward(hidden);
            // AdaLayerNorm(chunk_dim=1): shift, then scale.
            let m = self.norm_out_linear.forward(&temb.silu()).chunk(2, 1);
            let x = self.norm_out.forward(&x) * (m[1].unsqueeze(1) + 1.0) + m[0].unsqueeze(1);
            self.proj_out.forward(&x)
        });
        stats.note_output_projection(&projection_before);
        if computed {
            hooks.after_output_projection(&out);
        }
        self.unpatchify(&out, (b, f, h, w))
    }

    /// `[B, N, p_t·p²·C]` patch predictions back to latents `[B, F, C, H, W]`.
    fn unpatchify(&self, x: &Tensor, (b, f, h, w): (i64, i64, i64, i64)) -> Tensor {
        let p = self.config.patch_size;
        match self.config.patch_size_t {
            None => x
                .reshape([b, f, h / p, w / p, -1, p, p])
                .permute([0, 1, 4, 2, 5, 3, 6]) // (b, f, c, h', p, w', p)
                .flatten(5, 6)
                .flatten(3, 4),
            Some(pt) => x
                .reshape([b, (f + pt - 1) / pt, h / p, w / p, -1, pt, p, p])
                .permute([0, 1, 5, 4, 2, 6, 3, 7]) // (b, f', pt, c, h', p, w', p)
                .flatten(6, 7)
                .flatten(4, 5)
                .flatten(1, 2),
        }
    }
}

/// Multiply-adds of one `attn1` for one sample of `tokens` text + video tokens, as [`Attention`]
/// runs it: `to_q`, `to_k`, `to_v` and `to_out.0` on every token (D → D each), and `QKᵀ` and `AV`
/// over the whole sequence. Norms, RoPE and softmax are elementwise, left out.
pub fn attention_macs(c: &CogVideoXTransformerConfig, tokens: i64) -> f64 {
    let d = c.inner_dim() as f64;
    let l = tokens as f64;
    4.0 * l * d * d + 2.0 * l * l * d
}

/// Multiply-adds of one block for one sample (see [`attention_macs`]): its attention, the
/// feed-forward on every token (D → 4D → D), and the two expert modulations `norm1` and `norm2`
/// (`time_embed_dim` → 6D each, once per sample).
pub fn block_macs(c: &CogVideoXTransformerConfig, tokens: i64) -> f64 {
    let d = c.inner_dim() as f64;
    let l = tokens as f64;
    let modulation = 2.0 * c.time_embed_dim as f64 * 6.0 * d;
    attention_macs(c, tokens) + l * 2.0 * MLP_RATIO as f64 * d * d + modulation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_match_a_hand_count() {
        // D = 8 (one head of 8), time_embed_dim 4; one sample of 2 text + 4 video tokens (L = 6).
        let c: CogVideoXTransformerConfig = serde_json::from_str(
            r#"{"num_attention_heads": 1, "attention_head_dim": 8, "time_embed_dim": 4}"#,
        )
        .unwrap();
        // attn1: to_q, to_k, to_v, to_out.0 on 6 tokens 4·6·8·8 = 1536; QKᵀ 6·6·8 = 288;
        // AV 288. Total 2112.
        assert_eq!(attention_macs(&c, 6), 2112.0);
        // Block: + ff 6·(8·32 + 32·8) = 3072; norm1 and norm2 linears 2·4·48 = 384.
        // Total 2112 + 3456 = 5568.
        assert_eq!(block_macs(&c, 6), 5568.0);
    }
}
