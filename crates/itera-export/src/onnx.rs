//! The model as two ONNX graphs (opset 21):
//!
//! - `step.onnx`: `token` [B] int64 and, per layer L, `past.L.conv` [B, d_conv - 1, d_inner] and
//!   `past.L.ssm` [B, N, d_inner] -> `logits` [B, vocab], `present.L.conv`, `present.L.ssm`
//!   (feed `present.*` back as `past.*` for the next token; zeros start a text);
//! - `prefill.onnx`: `tokens` [B, T] int64 and the same `past.*` -> `logits` [B, T, vocab] and the
//!   final `present.*`: the step's computation as the body of one ONNX `Scan` over time, exactly
//!   the recurrence the runtime runs (its projections run once per position inside the loop).
//!
//! MoE routing as in the model: softmax over the router's logits, `TopK` (per layer, since
//! pruning may leave layers with different expert counts), the weights below `moe_skip_beta` x
//! the first masked out when skipping is on, the rest renormalised and scattered into a [B, experts] gate matrix that is zero elsewhere; every
//! expert then runs on every row and the outputs are summed with those gates. The result is the
//! model's exactly; the cost is all experts' FLOPs instead of top-k's (2x the expert work for
//! 4 experts, top-2), since ONNX has no cheap per-row dispatch.
//!
//! Weights are initializers in the outer graph ([out, in] as stored; `Gemm` with transB). From a
//! Q8_0 GGUF, Q8_0 matrices stay int8 with their block scales and become f32 through a blocked
//! `DequantizeLinear` (QDQ) before use; every other stored format is written as f32.

use itera_core::config::{Mixer, ModelConfig};
use itera_core::tensors::{ModelSpec, Spec, SwigluSpec};

use crate::graph::{model, value_info, Attr, Dim, Graph};
use crate::onnx_proto::{tensor_proto::DataType, ModelProto};
use crate::{Error, Result, Stored, WeightSource};

/// Names of a layer's state tensors for a graph whose names start with `prefix`.
fn state_names(prefix: &str, l: usize) -> [String; 4] {
    [
        format!("{prefix}past.{l}.conv"),
        format!("{prefix}past.{l}.ssm"),
        format!("{prefix}present.{l}.conv"),
        format!("{prefix}present.{l}.ssm"),
    ]
}

/// The weights as graph values: each matrix's f32 value name (dequantized in the graph when
/// stored as Q8_0) and the derived constants of each layer.
struct Values {
    embed: String,
    norm_f: String,
    eps: String,
    layers: Vec<LayerValues>,
}

struct LayerValues {
    norm: String,
    in_proj: String,
    conv_t: String,
    conv_b: String,
    x_proj: String,
    dt_proj: String,
    dt_b: String,
    a_t: String,
    d: String,
    out_proj: String,
    moe: Option<MoeValues>,
    ffn: Option<(String, [String; 3])>,
}

struct MoeValues {
    norm: String,
    router: String,
    experts: Vec<[String; 3]>,
}

/// Adds one weight: an f32 initializer, or int8 codes + f32 block scales and a blocked
/// DequantizeLinear producing the f32 value.
fn weight(g: &mut Graph, src: &dyn WeightSource, s: &Spec) -> Result<String> {
    Ok(match src.get(s)? {
        Stored::F32(v) => g.f32_init(&s.name, &s.shape, &v),
        Stored::Q8_0 { codes, scales } => {
            let (rows, cols) = s.rows_cols();
            let q = g.i8_init(&format!("{}.q", s.name), &[rows, cols], &codes);
            let d = g.f32_init(&format!("{}.scale", s.name), &[rows, cols / 32], &scales);
            g.node(
                "DequantizeLinear",
                &[&q, &d],
                &[&s.name],
                vec![("axis", Attr::Int(1)), ("block_size", Attr::Int(32))],
            )
        }
    })
}

fn values(
    g: &mut Graph,
    cfg: &ModelConfig,
    spec: &ModelSpec,
    src: &dyn WeightSource,
) -> Result<Values> {
    let (di, n, k) = (cfg.d_inner(), cfg.d_state, cfg.d_conv);
    let f32s = |s: &Spec| -> Result<Vec<f32>> {
        match src.get(s)? {
            Stored::F32(v) => Ok(v),
            Stored::Q8_0 { .. } => {
                Err(Error::Export(format!("`{}` must be stored as f32", s.name)))
            }
        }
    };
    let swiglu = |g: &mut Graph, m: &SwigluSpec| -> Result<[String; 3]> {
        Ok([
            weight(g, src, &m.gate)?,
            weight(g, src, &m.up)?,
            weight(g, src, &m.down)?,
        ])
    };
    let mut layers = Vec::new();
    for (l, ls) in spec.layers.iter().enumerate() {
        let m = ls.ssm().expect("checked: SSM mixers");
        let conv = f32s(&m.conv)?; // [di, k] -> [k, di]
        let conv_t: Vec<f32> = (0..k)
            .flat_map(|j| (0..di).map(move |c| (c, j)))
            .map(|(c, j)| conv[c * k + j])
            .collect();
        let a_log = f32s(&m.a_log)?; // [di, n] -> A = -exp, [n, di]
        let a_t: Vec<f32> = (0..n)
            .flat_map(|j| (0..di).map(move |c| (c, j)))
            .map(|(c, j)| -a_log[c * n + j].exp())
            .collect();
        let p = format!("layers.{l}.");
        layers.push(LayerValues {
            norm: weight(g, src, &ls.norm)?,
            in_proj: weight(g, src, &m.in_proj)?,
            conv_t: g.f32_init(&format!("{p}conv_t"), &[k, di], &conv_t),
            conv_b: weight(g, src, &m.conv_bias)?,
            x_proj: weight(g, src, &m.x_proj)?,
            dt_proj: weight(g, src, &m.dt_proj)?,
            dt_b: weight(g, src, &m.dt_bias)?,
            a_t: g.f32_init(&format!("{p}A_t"), &[n, di], &a_t),
            d: weight(g, src, &m.d)?,
            out_proj: weight(g, src, &m.out_proj)?,
            moe: match &ls.moe {
                Some(moe) => Some(MoeValues {
                    norm: weight(g, src, &moe.norm)?,
                    router: weight(g, src, &moe.router)?,
                    experts: moe
                        .experts
                        .iter()
                        .map(|e| swiglu(g, e))
                        .collect::<Result<_>>()?,
                }),
                None => None,
            },
            ffn: match &ls.ffn {
                Some(f) => Some((weight(g, src, &f.norm)?, swiglu(g, &f.mlp)?)),
                None => None,
            },
        });
    }
    Ok(Values {
        embed: weight(g, src, &spec.embed)?,
        norm_f: weight(g, src, &spec.norm_f)?,
        eps: g.f32_init("const.eps", &[], &[cfg.norm_eps as f32]),
        layers,
    })
}

/// Emits one token's computation for every layer into `g` (names prefixed by `pre`): from
/// `token` [B] and the `pre`past.* states to `pre`logits [B, vocab] and `pre`present.*.
struct Step<'a> {
    g: &'a mut Graph,
    v: &'a Values,
    pre: String,
    axes: AxesConst,
}

/// Shared int64 constants (axes, split sizes, slice bounds), as outer initializers.
struct AxesConst {
    a1: String,
    a2: String,
    last: String,
}

impl Step<'_> {
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let pre = format!("{}t", self.pre);
        self.g.op(op, inputs, &pre, attrs)
    }

    fn rms_norm(&mut self, x: &str, w: &str) -> String {
        let sq = self.op("Mul", &[x, x], vec![]);
        let last = self.axes.last.clone();
        let ms = self.op(
            "ReduceMean",
            &[&sq, &last],
            vec![("keepdims", Attr::Int(1))],
        );
        let eps = self.v.eps.clone();
        let s = self.op("Add", &[&ms, &eps], vec![]);
        let r = self.op("Sqrt", &[&s], vec![]);
        let inv = self.op("Reciprocal", &[&r], vec![]);
        let xn = self.op("Mul", &[x, &inv], vec![]);
        self.op("Mul", &[&xn, w], vec![])
    }

    fn linear(&mut self, x: &str, w: &str) -> String {
        self.op("Gemm", &[x, w], vec![("transB", Attr::Int(1))])
    }

    fn silu(&mut self, x: &str) -> String {
        let s = self.op("Sigmoid", &[x], vec![]);
        self.op("Mul", &[x, &s], vec![])
    }

    fn swiglu(&mut self, h: &str, m: &[String; 3]) -> String {
        let g = self.linear(h, &m[0]);
        let g = self.silu(&g);
        let u = self.linear(h, &m[1]);
        let gu = self.op("Mul", &[&g, &u], vec![]);
        self.linear(&gu, &m[2])
    }

    fn split(&mut self, x: &str, sizes: &[usize], consts: &mut Graph) -> Vec<String> {
        let name = format!(
            "const.split.{}",
            sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("_")
        );
        if !consts
            .proto
            .initializer
            .iter()
            .any(|t| t.name.as_deref() == Some(name.as_str()))
        {
            consts.i64_init(&name, &sizes.iter().map(|&s| s as i64).collect::<Vec<_>>());
        }
        let outs: Vec<String> = (0..sizes.len())
            .map(|i| format!("{}{}.{}", self.pre, x, i))
            .collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.g
            .node("Split", &[x, &name], &refs, vec![("axis", Attr::Int(1))]);
        outs
    }
}

/// The layers of one step. `consts` receives shared constants (the outer graph: for the scan
/// body, the step graph otherwise); `slice` holds the bounds of a conv window's tail.
#[allow(clippy::too_many_arguments)]
fn emit_step(
    g: &mut Graph,
    consts: &mut Graph,
    v: &Values,
    cfg: &ModelConfig,
    spec: &ModelSpec,
    pre: &str,
    token: &str,
    top_k: usize,
) -> String {
    let (di, n, r, k) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank, cfg.d_conv);
    let axes = AxesConst {
        a1: consts_i64(consts, "const.axis1", &[1]),
        a2: consts_i64(consts, "const.axis2", &[2]),
        last: consts_i64(consts, "const.axis_last", &[-1]),
    };
    let slice = [
        consts_i64(consts, "const.conv_tail_start", &[1]),
        consts_i64(consts, "const.conv_tail_end", &[k as i64]),
    ];
    let topk = consts_i64(consts, "const.top_k", &[top_k as i64]);
    let mut s = Step {
        g,
        v,
        pre: pre.to_string(),
        axes,
    };
    let a1 = s.axes.a1.clone();
    let a2 = s.axes.a2.clone();
    let mut x = s.op("Gather", &[&v.embed, token], vec![("axis", Attr::Int(0))]);
    for (l, (lv, ls)) in v.layers.iter().zip(&spec.layers).enumerate() {
        let [past_conv, past_ssm, present_conv, present_ssm] = state_names(pre, l);
        // Mixer: x += out_proj(scan(conv(in_proj(norm(x))))).
        let h = s.rms_norm(&x, &lv.norm);
        let xz = s.linear(&h, &lv.in_proj);
        let parts = s.split(&xz, &[di, di], consts);
        let (xi, z) = (&parts[0], &parts[1]);
        let xi3 = s.op("Unsqueeze", &[xi, &a1], vec![]);
        let win = s.op("Concat", &[&past_conv, &xi3], vec![("axis", Attr::Int(1))]); // [B, k, di]
        s.g.node(
            "Slice",
            &[&win, &slice[0], &slice[1], &a1],
            &[&present_conv],
            vec![],
        );
        let taps = s.op("Mul", &[&win, &lv.conv_t], vec![]);
        let conv = s.op("ReduceSum", &[&taps, &a1], vec![("keepdims", Attr::Int(0))]);
        let conv = s.op("Add", &[&conv, &lv.conv_b], vec![]);
        let xc = s.silu(&conv);
        let dbc = s.linear(&xc, &lv.x_proj);
        let parts = s.split(&dbc, &[r, n, n], consts);
        let (dt_low, bm, cm) = (&parts[0], &parts[1], &parts[2]);
        let dt = s.op(
            "Gemm",
            &[dt_low, &lv.dt_proj, &lv.dt_b],
            vec![("transB", Attr::Int(1))],
        );
        let dt = s.op("Softplus", &[&dt], vec![]);
        let dt3 = s.op("Unsqueeze", &[&dt, &a1], vec![]); // [B, 1, di]
        let da = s.op("Mul", &[&dt3, &lv.a_t], vec![]); // [B, N, di]
        let decay = s.op("Exp", &[&da], vec![]);
        let dx = s.op("Mul", &[&dt, &xc], vec![]);
        let dx3 = s.op("Unsqueeze", &[&dx, &a1], vec![]); // [B, 1, di]
        let b3 = s.op("Unsqueeze", &[bm, &a2], vec![]); // [B, N, 1]
        let write = s.op("Mul", &[&dx3, &b3], vec![]);
        let kept = s.op("Mul", &[&decay, &past_ssm], vec![]);
        s.g.node("Add", &[&kept, &write], &[&present_ssm], vec![]);
        let c3 = s.op("Unsqueeze", &[cm, &a2], vec![]);
        let read = s.op("Mul", &[&present_ssm, &c3], vec![]);
        let y = s.op("ReduceSum", &[&read, &a1], vec![("keepdims", Attr::Int(0))]);
        let skip = s.op("Mul", &[&xc, &lv.d], vec![]);
        let y = s.op("Add", &[&y, &skip], vec![]);
        let gate = s.silu(z);
        let y = s.op("Mul", &[&y, &gate], vec![]);
        let out = s.linear(&y, &lv.out_proj);
        x = s.op("Add", &[&x, &out], vec![]);
        // Feed-forward: x += sum of gate_e * expert_e(norm(x)) (or a dense SwiGLU).
        if let Some(mv) = &lv.moe {
            let experts = ls.moe.as_ref().map_or(0, |m| m.experts.len());
            let h = s.rms_norm(&x, &mv.norm);
            let logits = s.linear(&h, &mv.router);
            let probs = s.op("Softmax", &[&logits], vec![("axis", Attr::Int(1))]);
            let topk_name = if experts > top_k {
                topk.clone()
            } else {
                consts_i64(consts, &format!("const.top_k.{experts}"), &[experts as i64])
            };
            let vals = format!("{pre}l{l}.topv");
            let idx = format!("{pre}l{l}.topi");
            s.g.node(
                "TopK",
                &[&probs, &topk_name],
                &[&vals, &idx],
                vec![
                    ("axis", Attr::Int(1)),
                    ("largest", Attr::Int(1)),
                    ("sorted", Attr::Int(1)),
                ],
            );
            // Dynamic skipping: weights below beta x the first are dropped before renormalising.
            let vals = if cfg.moe_skip_beta > 0.0 {
                let beta = consts_f32(consts, "const.skip_beta", cfg.moe_skip_beta as f32);
                let (zero, one) = (
                    consts_i64(consts, "const.e0", &[0]),
                    consts_i64(consts, "const.e1", &[1]),
                );
                let first = s.op("Slice", &[&vals, &zero, &one, &a1], vec![]); // [B, 1]
                let floor = s.op("Mul", &[&first, &beta], vec![]);
                let keep = s.op("GreaterOrEqual", &[&vals, &floor], vec![]);
                let keep = s.op("Cast", &[&keep], vec![("to", Attr::Int(1))]);
                s.op("Mul", &[&vals, &keep], vec![])
            } else {
                vals
            };
            let total = s.op("ReduceSum", &[&vals, &a1], vec![("keepdims", Attr::Int(1))]);
            let w = s.op("Div", &[&vals, &total], vec![]);
            let shape = s.op("Shape", &[&probs], vec![]);
            let zeros = s.op("ConstantOfShape", &[&shape], vec![]);
            let gates = s.op(
                "ScatterElements",
                &[&zeros, &idx, &w],
                vec![("axis", Attr::Int(1))],
            );
            let mut sum: Option<String> = None;
            for (e, ex) in mv.experts.iter().enumerate() {
                let ye = s.swiglu(&h, ex);
                let start = consts_i64(consts, &format!("const.e{e}"), &[e as i64]);
                let end = consts_i64(consts, &format!("const.e{}", e + 1), &[e as i64 + 1]);
                let ge = s.op("Slice", &[&gates, &start, &end, &a1], vec![]); // [B, 1]
                let c = s.op("Mul", &[&ye, &ge], vec![]);
                sum = Some(match sum {
                    None => c,
                    Some(acc) => s.op("Add", &[&acc, &c], vec![]),
                });
            }
            x = s.op("Add", &[&x, &sum.expect("experts")], vec![]);
        } else if let Some((norm, mlp)) = &lv.ffn {
            let h = s.rms_norm(&x, norm);
            let y = s.swiglu(&h, mlp);
            x = s.op("Add", &[&x, &y], vec![]);
        }
    }
    let h = s.rms_norm(&x, &v.norm_f);
    let logits = format!("{pre}logits");
    s.g.node(
        "Gemm",
        &[&h, &v.embed],
        &[&logits],
        vec![("transB", Attr::Int(1))],
    );
    logits
}

/// A scalar f32 constant of the graph (added once).
fn consts_f32(g: &mut Graph, name: &str, value: f32) -> String {
    if !g
        .proto
        .initializer
        .iter()
        .any(|t| t.name.as_deref() == Some(name))
    {
        g.f32_init(name, &[1], &[value]);
    }
    name.to_string()
}

fn consts_i64(g: &mut Graph, name: &str, values: &[i64]) -> String {
    if !g
        .proto
        .initializer
        .iter()
        .any(|t| t.name.as_deref() == Some(name))
    {
        g.i64_init(name, values);
    }
    name.to_string()
}

fn state_inputs(g: &mut Graph, cfg: &ModelConfig, pre: &str, batch: Dim) -> Vec<(String, String)> {
    let (di, n, k) = (
        cfg.d_inner() as i64,
        cfg.d_state as i64,
        cfg.d_conv as i64 - 1,
    );
    let b = || match &batch {
        Dim::Named(s) => Dim::Named(s),
        Dim::Fixed(v) => Dim::Fixed(*v),
    };
    (0..cfg.n_layers)
        .map(|l| {
            let [pc, ps, oc, os] = state_names(pre, l);
            g.input(value_info(
                &pc,
                DataType::Float,
                &[b(), Dim::Fixed(k), Dim::Fixed(di)],
            ));
            g.input(value_info(
                &ps,
                DataType::Float,
                &[b(), Dim::Fixed(n), Dim::Fixed(di)],
            ));
            (oc, os)
        })
        .collect()
}

/// Checks that the model can be expressed (recurrent, per-channel SSM).
pub fn check(cfg: &ModelConfig) -> Result<()> {
    match cfg.mixer {
        Mixer::Selective => Ok(()),
        Mixer::Attention => Err(Error::Export(format!(
            "`{}` is the attention baseline: it has no recurrent step to export (it trains and \
             evaluates with sliding windows only)",
            cfg.preset
        ))),
        Mixer::SharedState => Err(Error::Export(
            "the shared-state mixer is a training baseline and is not exported to ONNX".into(),
        )),
    }
}

/// `step.onnx`.
pub fn step_model(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<ModelProto> {
    check(cfg)?;
    let spec = ModelSpec::new(cfg);
    let mut g = Graph::new("itera_lite_step");
    let v = values(&mut g, cfg, &spec, src)?;
    g.input(value_info("token", DataType::Int64, &[Dim::Named("batch")]));
    let outs = state_inputs(&mut g, cfg, "", Dim::Named("batch"));
    let mut consts = Graph::new("consts");
    let logits = emit_step(&mut g, &mut consts, &v, cfg, &spec, "", "token", cfg.top_k);
    g.proto.initializer.extend(consts.proto.initializer);
    g.output(value_info(
        &logits,
        DataType::Float,
        &[Dim::Named("batch"), Dim::Fixed(cfg.vocab_size as i64)],
    ));
    push_state_outputs(&mut g, cfg, &outs, Dim::Named("batch"));
    Ok(model(
        g.proto,
        "Itera-Lite recurrent step: token + past.* -> logits + present.*",
    ))
}

fn push_state_outputs(g: &mut Graph, cfg: &ModelConfig, outs: &[(String, String)], batch: Dim) {
    let (di, n, k) = (
        cfg.d_inner() as i64,
        cfg.d_state as i64,
        cfg.d_conv as i64 - 1,
    );
    for (oc, os) in outs {
        let b = match &batch {
            Dim::Named(s) => Dim::Named(s),
            Dim::Fixed(v) => Dim::Fixed(*v),
        };
        let b2 = match &batch {
            Dim::Named(s) => Dim::Named(s),
            Dim::Fixed(v) => Dim::Fixed(*v),
        };
        g.output(value_info(
            oc,
            DataType::Float,
            &[b, Dim::Fixed(k), Dim::Fixed(di)],
        ));
        g.output(value_info(
            os,
            DataType::Float,
            &[b2, Dim::Fixed(n), Dim::Fixed(di)],
        ));
    }
}

/// `prefill.onnx`: a Scan over time whose body is one step.
pub fn prefill_model(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<ModelProto> {
    check(cfg)?;
    let spec = ModelSpec::new(cfg);
    let mut outer = Graph::new("itera_lite_prefill");
    let v = values(&mut outer, cfg, &spec, src)?;
    outer.input(value_info(
        "tokens",
        DataType::Int64,
        &[Dim::Named("batch"), Dim::Named("time")],
    ));
    let outs = state_inputs(&mut outer, cfg, "", Dim::Named("batch"));
    // The body: states and one token column in, states and that column's logits out.
    let mut body = Graph::new("step_body");
    let body_outs = state_inputs(&mut body, cfg, "s.", Dim::Named("batch"));
    body.input(value_info(
        "s.token",
        DataType::Int64,
        &[Dim::Named("batch")],
    ));
    let mut consts = Graph::new("consts");
    let logits = emit_step(
        &mut body,
        &mut consts,
        &v,
        cfg,
        &spec,
        "s.",
        "s.token",
        cfg.top_k,
    );
    push_state_outputs(&mut body, cfg, &body_outs, Dim::Named("batch"));
    body.output(value_info(
        &logits,
        DataType::Float,
        &[Dim::Named("batch"), Dim::Fixed(cfg.vocab_size as i64)],
    ));
    outer.proto.initializer.extend(consts.proto.initializer);
    let mut inputs: Vec<String> = (0..cfg.n_layers)
        .flat_map(|l| {
            let [pc, ps, _, _] = state_names("", l);
            [pc, ps]
        })
        .collect();
    inputs.push("tokens".into());
    let mut outputs: Vec<String> = outs
        .iter()
        .flat_map(|(c, s)| [c.clone(), s.clone()])
        .collect();
    outputs.push("logits".into());
    let in_refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let out_refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    outer.node(
        "Scan",
        &in_refs,
        &out_refs,
        vec![
            ("body", Attr::Graph(Box::new(body.proto))),
            ("num_scan_inputs", Attr::Int(1)),
            ("scan_input_axes", Attr::Ints(vec![1])),
            ("scan_output_axes", Attr::Ints(vec![1])),
        ],
    );
    push_state_outputs(&mut outer, cfg, &outs, Dim::Named("batch"));
    outer.output(value_info(
        "logits",
        DataType::Float,
        &[
            Dim::Named("batch"),
            Dim::Named("time"),
            Dim::Fixed(cfg.vocab_size as i64),
        ],
    ));
    Ok(model(outer.proto, "Itera-Lite prefill: tokens [B, T] + past.* -> logits [B, T, V] + present.* (a Scan over time)"))
}
