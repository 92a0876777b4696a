//! A small builder over the ONNX protobuf types: nodes with attributes, initializers from Rust
//! values, typed inputs and outputs, and the model wrapper. Names are the caller's: one prefix
//! per (sub)graph keeps them unique, as ONNX requires (no shadowing of outer names).

use crate::onnx_proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The opset the graphs use: 21 has blocked DequantizeLinear (Q8_0 as QDQ).
pub const OPSET: i64 = 21;

/// One attribute value.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Graph(Box<GraphProto>),
}

/// A dimension of a declared input or output: fixed, or named (dynamic).
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

#[derive(Default)]
pub struct Graph {
    pub proto: GraphProto,
    counter: usize,
}

fn attribute(name: &str, a: Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let kind = match a {
        Attr::Int(i) => {
            p.i = Some(i);
            AttributeType::Int
        }
        Attr::Ints(v) => {
            p.ints = v;
            AttributeType::Ints
        }
        Attr::Graph(g) => {
            p.g = Some(*g);
            AttributeType::Graph
        }
    };
    p.r#type = Some(kind as i32);
    p
}

/// A tensor proto of raw little-endian `bytes`.
pub fn tensor(name: &str, dims: &[usize], dtype: DataType, bytes: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(dtype as i32),
        raw_data: Some(bytes),
        ..Default::default()
    }
}

pub fn value_info(name: &str, dtype: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                Dim::Named(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    pub fn new(name: &str) -> Self {
        Self {
            proto: GraphProto {
                name: Some(name.to_string()),
                ..Default::default()
            },
            counter: 0,
        }
    }

    /// Adds a node writing `outputs`; returns the first output's name.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        self.counter += 1;
        self.proto.node.push(NodeProto {
            name: Some(format!("{op}_{}", self.counter)),
            op_type: Some(op.to_string()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            ..Default::default()
        });
        outputs[0].to_string()
    }

    /// A node with one output named `prefix` + a counter.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        prefix: &str,
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let out = format!("{prefix}.{}", self.counter + 1);
        self.node(op, inputs, &[&out], attrs)
    }

    pub fn f32_init(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.proto
            .initializer
            .push(tensor(name, dims, DataType::Float, bytes));
        name.to_string()
    }

    pub fn i64_init(&mut self, name: &str, values: &[i64]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.proto
            .initializer
            .push(tensor(name, &[values.len()], DataType::Int64, bytes));
        name.to_string()
    }

    pub fn i8_init(&mut self, name: &str, dims: &[usize], values: &[i8]) -> String {
        let bytes = values.iter().map(|&v| v as u8).collect();
        self.proto
            .initializer
            .push(tensor(name, dims, DataType::Int8, bytes));
        name.to_string()
    }

    pub fn input(&mut self, v: ValueInfoProto) {
        self.proto.input.push(v);
    }

    pub fn output(&mut self, v: ValueInfoProto) {
        self.proto.output.push(v);
    }
}

/// The model file: IR version 10 (what onnxruntime reads), the default-domain opset.
pub fn model(graph: GraphProto, doc: &str) -> ModelProto {
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("itera-lite".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(doc.into()),
        graph: Some(graph),
        ..Default::default()
    }
}
