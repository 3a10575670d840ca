//! JSON Schema → [`Schema`]: the node graph the checker walks. Refuses, naming the place in
//! the schema, every keyword it would otherwise have to ignore while generating, so that what
//! it accepts is what it enforces.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::bounds;
use super::pattern::{self, StringPattern, FORMATS};
use super::{
    ByteSet, Node, NodeId, ObjectSpec, Prop, Schema, ANY, ANY_ARRAY, ANY_OBJECT, MAX_DEPTH,
};

/// Most properties one object may declare (the checker keeps candidate names in a `u128`).
pub const MAX_PROPERTIES: usize = 128;
/// Most nodes one schema may compile to (bounds the work a request can ask for).
pub const MAX_NODES: usize = 4096;
/// Most automaton states all of one schema's patterns may hold together (512 bytes each).
pub const MAX_PATTERN_STATES_TOTAL: usize = 8192;

/// Why a schema was refused: where (a JSON pointer into the schema) and what.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaError {
    pub at: String,
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.at.is_empty() { "/" } else { &self.at };
        write!(f, "at {at}: {}", self.message)
    }
}

impl std::error::Error for SchemaError {}

fn err<T>(at: &str, message: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError {
        at: at.to_string(),
        message: message.into(),
    })
}

/// Keywords that describe but do not constrain: accepted and ignored.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];
const OBJECT_KEYWORDS: &[&str] = &[
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
];
const ARRAY_KEYWORDS: &[&str] = &[
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
    "uniqueItems",
];
const STRING_KEYWORDS: &[&str] = &["minLength", "maxLength", "pattern", "format"];
const NUMBER_KEYWORDS: &[&str] = &bounds::KEYWORDS;

impl Schema {
    /// Compiles a JSON Schema (the subset in the module docs).
    pub fn compile(schema: &Value) -> Result<Schema, SchemaError> {
        let mut c = Compiler {
            root: schema,
            nodes: vec![
                Node::Any,
                Node::Object(ObjectSpec {
                    props: Vec::new(),
                    additional: Some(ANY),
                    min_props: 0,
                    max_props: u32::MAX,
                    windows: Vec::new(),
                    required_from: Vec::new(),
                }),
                Node::Array {
                    items: ANY,
                    prefix: Box::new([]),
                    min_items: 0,
                    max_items: None,
                    unique: false,
                },
            ],
            refs: HashMap::new(),
            patterns: HashMap::new(),
            pattern_states: 0,
            unique_arrays: Vec::new(),
        };
        let root = c.compile(schema, "")?;
        c.finish(root)
    }
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    /// `$ref` targets already compiled (or being compiled: recursion ends here).
    refs: HashMap<String, NodeId>,
    /// Patterns compiled so far, by source and length bounds (a format used by many properties
    /// compiles once).
    patterns: HashMap<(String, u32, Option<u32>), Arc<StringPattern>>,
    /// States of the distinct patterns so far.
    pattern_states: usize,
    /// Arrays under `uniqueItems` and their places, checked once references resolve.
    unique_arrays: Vec<(NodeId, String)>,
}

/// Most enum literals `uniqueItems` can keep apart (one bit each in the array's frame).
const MAX_UNIQUE_LITERALS: usize = 32;

impl Compiler<'_> {
    fn add(&mut self, node: Node, at: &str) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= MAX_NODES {
            return err(
                at,
                format!("the schema is too large (over {MAX_NODES} nodes)"),
            );
        }
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn compile(&mut self, v: &Value, at: &str) -> Result<NodeId, SchemaError> {
        let obj = match v {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return err(at, "the schema `false` admits no value"),
            Value::Object(o) => o,
            _ => return err(at, "a schema must be an object (or `true`)"),
        };
        for key in obj.keys() {
            let known = ANNOTATIONS.contains(&key.as_str())
                || OBJECT_KEYWORDS.contains(&key.as_str())
                || ARRAY_KEYWORDS.contains(&key.as_str())
                || STRING_KEYWORDS.contains(&key.as_str())
                || NUMBER_KEYWORDS.contains(&key.as_str())
                || ["type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"]
                    .contains(&key.as_str());
            if !known {
                return err(
                    at,
                    format!("the keyword `{key}` is not supported in generation"),
                );
            }
        }
        let constraining: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !ANNOTATIONS.contains(k))
            .collect();
        if let Some(r) = obj.get("$ref") {
            if constraining.len() > 1 {
                return err(at, "`$ref` cannot be combined with other keywords here");
            }
            return self.reference(r, at);
        }
        if let Some(all) = obj.get("allOf") {
            // One schema (what older Pydantic wraps a `$ref` in, beside a description): that
            // schema. Intersections of several are not enforced.
            return match all {
                Value::Array(one) if one.len() == 1 && constraining.len() == 1 => {
                    self.compile(&one[0], &format!("{at}/allOf/0"))
                }
                _ => err(
                    &format!("{at}/allOf"),
                    "only `allOf` with one schema and nothing else beside it is supported",
                ),
            };
        }
        for combinator in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(combinator) {
                if constraining.len() > 1 {
                    return err(
                        at,
                        format!("`{combinator}` cannot be combined with other keywords here"),
                    );
                }
                return self.union(alts, &format!("{at}/{combinator}"));
            }
        }
        let types = self.types(obj, at)?;
        if let Some(literal) = ["enum", "const"].into_iter().find(|k| obj.contains_key(*k)) {
            // The literals are the values; a bound beside them would go unchecked.
            let beside = constraining
                .iter()
                .find(|k| !["type", "enum", "const"].contains(k));
            if let Some(other) = beside {
                return err(
                    at,
                    format!("`{literal}` cannot be combined with `{other}` here"),
                );
            }
        }
        if let Some(values) = obj.get("enum") {
            let Value::Array(values) = values else {
                return err(&format!("{at}/enum"), "`enum` must be an array");
            };
            return self.literals(values, types.as_deref(), &format!("{at}/enum"));
        }
        if let Some(value) = obj.get("const") {
            return self.literals(
                std::slice::from_ref(value),
                types.as_deref(),
                &format!("{at}/const"),
            );
        }
        let types = match types {
            Some(t) => t,
            None => infer_type(obj, at)?,
        };
        let mut alts = Vec::new();
        for t in &types {
            let id = match t.as_str() {
                "null" => self.add(Node::Null, at)?,
                "boolean" => self.add(Node::Boolean, at)?,
                "integer" if types.iter().any(|t| t == "number") => continue,
                "integer" => self.number(obj, true, at)?,
                "number" => self.number(obj, false, at)?,
                "string" => self.string(obj, at)?,
                "array" => self.array(obj, at)?,
                "object" => self.object(obj, at)?,
                "any" => ANY,
                other => return err(&format!("{at}/type"), format!("unknown type `{other}`")),
            };
            alts.push(id);
        }
        match alts.as_slice() {
            [one] => Ok(*one),
            _ => self.add(Node::Union(alts.into_iter().map(|a| (0, a)).collect()), at),
        }
    }

    /// `type` as a list; `None` when absent.
    fn types(
        &self,
        obj: &Map<String, Value>,
        at: &str,
    ) -> Result<Option<Vec<String>>, SchemaError> {
        let at = format!("{at}/type");
        match obj.get("type") {
            None => Ok(None),
            Some(Value::String(t)) => Ok(Some(vec![t.clone()])),
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| match t {
                    Value::String(t) => Ok(t.clone()),
                    _ => err(&at, "`type` entries must be strings"),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => err(
                &at,
                "`type` must be a string or a non-empty array of strings",
            ),
        }
    }

    fn reference(&mut self, r: &Value, at: &str) -> Result<NodeId, SchemaError> {
        let at = format!("{at}/$ref");
        let Some(pointer) = r.as_str().and_then(|r| r.strip_prefix('#')) else {
            return err(
                &at,
                "only references inside this schema (`#/...`) are supported",
            );
        };
        if let Some(&id) = self.refs.get(pointer) {
            return Ok(id);
        }
        let Some(target) = self.root.pointer(pointer) else {
            return err(&at, format!("`#{pointer}` names nothing in this schema"));
        };
        // Reserved before the target compiles, so a recursive reference finds it.
        let id = self.add(Node::Alias(NodeId::MAX), &at)?;
        self.refs.insert(pointer.to_string(), id);
        let target = self.compile(target, pointer)?;
        self.nodes[id as usize] = Node::Alias(target);
        Ok(id)
    }

    fn union(&mut self, alts: &Value, at: &str) -> Result<NodeId, SchemaError> {
        let alts = match alts {
            Value::Array(a) if !a.is_empty() => a,
            _ => return err(at, "must be a non-empty array of schemas"),
        };
        let mut ids = Vec::with_capacity(alts.len());
        for (i, alt) in alts.iter().enumerate() {
            ids.push((0, self.compile(alt, &format!("{at}/{i}"))?));
        }
        self.add(Node::Union(ids), at)
    }

    /// `enum` / `const`: each value is matched as its compact JSON text.
    fn literals(
        &mut self,
        values: &[Value],
        types: Option<&[String]>,
        at: &str,
    ) -> Result<NodeId, SchemaError> {
        if values.is_empty() {
            return err(at, "an empty `enum` admits no value");
        }
        let mut texts = Vec::with_capacity(values.len());
        for v in values {
            if let Some(types) = types {
                if !types.iter().any(|t| type_admits(t, v)) {
                    return err(at, format!("{v} is not of the schema's `type`"));
                }
            }
            let text = serde_json::to_vec(v).map_err(|e| SchemaError {
                at: at.to_string(),
                message: e.to_string(),
            })?;
            texts.push(text.into_boxed_slice());
        }
        texts.sort();
        texts.dedup();
        self.add(Node::Enum(texts), at)
    }

    fn number(
        &mut self,
        obj: &Map<String, Value>,
        integer: bool,
        at: &str,
    ) -> Result<NodeId, SchemaError> {
        match bounds::parse(obj, integer, at) {
            Ok(None) => self.add(Node::Number { integer }, at),
            Ok(Some(b)) => self.add(Node::Bounded(b), at),
            Err((at, message)) => err(&at, message),
        }
    }

    fn string(&mut self, obj: &Map<String, Value>, at: &str) -> Result<NodeId, SchemaError> {
        let min_len = count(obj, "minLength", at)?.unwrap_or(0);
        let max_len = count(obj, "maxLength", at)?;
        if max_len.is_some_and(|m| m < min_len) {
            return err(at, "`maxLength` is below `minLength`");
        }
        let text = |key: &str| match obj.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => err(&format!("{at}/{key}"), "must be a string"),
        };
        let (source, place) = match (text("pattern")?, text("format")?) {
            (None, None) => return self.add(Node::String { min_len, max_len }, at),
            (Some(_), Some(_)) => {
                return err(at, "`pattern` and `format` together are not supported")
            }
            (Some(p), None) => (p.to_string(), format!("{at}/pattern")),
            (None, Some(f)) => match pattern::format_pattern(f) {
                Some(p) => (p, format!("{at}/format")),
                None => {
                    return err(
                        &format!("{at}/format"),
                        format!(
                        "the format `{f}` is not supported in generation (supported: {FORMATS})"
                    ),
                    )
                }
            },
        };
        let key = (source, min_len, max_len);
        let table = match self.patterns.get(&key) {
            Some(t) => Arc::clone(t),
            None => {
                let t =
                    pattern::compile(&key.0, min_len, max_len).map_err(|message| SchemaError {
                        at: place.clone(),
                        message,
                    })?;
                self.pattern_states += t.states();
                if self.pattern_states > MAX_PATTERN_STATES_TOTAL {
                    return err(
                        &place,
                        format!("the schema's patterns are too complex together (over {MAX_PATTERN_STATES_TOTAL} automaton states)"),
                    );
                }
                let t = Arc::new(t);
                self.patterns.insert(key, Arc::clone(&t));
                t
            }
        };
        self.add(Node::Pattern(table), at)
    }

    fn array(&mut self, obj: &Map<String, Value>, at: &str) -> Result<NodeId, SchemaError> {
        let min_items = count(obj, "minItems", at)?.unwrap_or(0);
        let mut max_items = count(obj, "maxItems", at)?;
        if max_items.is_some_and(|m| m < min_items) {
            return err(at, "`maxItems` is below `minItems`");
        }
        // Tuples: `prefixItems` + `items` (2020-12), or `items` as a list + `additionalItems`
        // (earlier drafts, Pydantic v1).
        let (prefix_key, rest_key) = match obj.get("items") {
            Some(Value::Array(_)) => ("items", "additionalItems"),
            _ => ("prefixItems", "items"),
        };
        let mut prefix = Vec::new();
        match obj.get(prefix_key) {
            None => {}
            Some(Value::Array(schemas)) => {
                for (i, p) in schemas.iter().enumerate() {
                    prefix.push(self.compile(p, &format!("{at}/{prefix_key}/{i}"))?);
                }
            }
            Some(_) => return err(&format!("{at}/{prefix_key}"), "must be an array of schemas"),
        }
        let items = match obj.get(rest_key) {
            None => ANY,
            Some(Value::Bool(false)) => {
                // No items past the tuple.
                max_items =
                    Some(max_items.map_or(prefix.len() as u32, |m| m.min(prefix.len() as u32)));
                if max_items.is_some_and(|m| m < min_items) {
                    return err(
                        at,
                        format!(
                            "`minItems` exceeds the {} items `{prefix_key}` allows",
                            prefix.len()
                        ),
                    );
                }
                ANY
            }
            Some(items) => self.compile(items, &format!("{at}/{rest_key}"))?,
        };
        let unique = match obj.get("uniqueItems") {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(_) => return err(&format!("{at}/uniqueItems"), "must be a boolean"),
        };
        if prefix.is_empty() && items == ANY && min_items == 0 && max_items.is_none() && !unique {
            return Ok(ANY_ARRAY);
        }
        let id = self.add(
            Node::Array {
                items,
                prefix: prefix.into_boxed_slice(),
                min_items,
                max_items,
                unique,
            },
            at,
        )?;
        if unique {
            self.unique_arrays.push((id, format!("{at}/uniqueItems")));
        }
        Ok(id)
    }

    fn object(&mut self, obj: &Map<String, Value>, at: &str) -> Result<NodeId, SchemaError> {
        let declared = match obj.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return err(&format!("{at}/properties"), "must be an object"),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|n| n.as_str())
                .collect::<Option<_>>()
                .ok_or_else(|| SchemaError {
                    at: format!("{at}/required"),
                    message: "must be an array of property names".into(),
                })?,
            Some(_) => return err(&format!("{at}/required"), "must be an array"),
        };
        let additional = match obj.get("additionalProperties") {
            // Absent counts as `false`, as in OpenAI's strict mode and xgrammar: generation
            // produces the declared properties only.
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(ANY),
            Some(s) => Some(self.compile(s, &format!("{at}/additionalProperties"))?),
        };
        let none_declared = Map::new();
        let min_props = count(obj, "minProperties", at)?.unwrap_or(0);
        let max_props = count(obj, "maxProperties", at)?.unwrap_or(u32::MAX);
        let bounded = min_props > 0 || max_props < u32::MAX;
        let declared = match declared {
            Some(d) => d,
            None if !bounded
                && (additional == Some(ANY) || obj.get("additionalProperties").is_none()) =>
            {
                if !required.is_empty() {
                    return err(&format!("{at}/required"), "names properties not declared");
                }
                // `{"type": "object"}` alone: any object, as JSON mode.
                return Ok(ANY_OBJECT);
            }
            None => &none_declared,
        };
        if declared.len() > MAX_PROPERTIES {
            return err(
                &format!("{at}/properties"),
                format!("at most {MAX_PROPERTIES} properties per object are supported"),
            );
        }
        for name in &required {
            if !declared.contains_key(*name) {
                return err(
                    &format!("{at}/required"),
                    format!("`{name}` is required but not in `properties`"),
                );
            }
        }
        let need = (required.len() as u32).max(min_props);
        if max_props < need {
            return err(
                at,
                "`maxProperties` is below `minProperties` or the number of required properties",
            );
        }
        if additional.is_none() && (declared.len() as u32) < min_props {
            return err(
                at,
                "`minProperties` exceeds the properties that may be written",
            );
        }
        let mut props = Vec::with_capacity(declared.len());
        for (name, schema) in declared {
            if name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
                return err(
                    &format!("{at}/properties"),
                    format!("property name {name:?}: quotes, backslashes and control characters are not supported"),
                );
            }
            let node =
                self.compile(schema, &format!("{at}/properties/{}", escape_pointer(name)))?;
            props.push(Prop {
                name: name.as_bytes().into(),
                node,
                required: required.contains(&name.as_str()),
            });
        }
        self.add(
            Node::Object(ObjectSpec {
                props,
                additional,
                min_props,
                max_props,
                windows: Vec::new(),
                required_from: Vec::new(),
            }),
            at,
        )
    }

    /// Resolves aliases, checks unions and depths, and fills each object's windows.
    fn finish(mut self, root: NodeId) -> Result<Schema, SchemaError> {
        let n = self.nodes.len();
        // Aliases resolve to a non-alias node; a chain longer than the node count is a cycle.
        let mut target = vec![0 as NodeId; n];
        for (id, slot) in target.iter_mut().enumerate() {
            let mut at = id as NodeId;
            let mut hops = 0;
            while let Node::Alias(next) = self.nodes[at as usize] {
                at = next;
                hops += 1;
                if hops > n {
                    return err("", "a `$ref` cycle refers only to itself");
                }
            }
            *slot = at;
        }
        let resolve = |id: NodeId| target[id as usize];
        for node in &mut self.nodes {
            match node {
                Node::Array { items, prefix, .. } => {
                    *items = resolve(*items);
                    prefix.iter_mut().for_each(|p| *p = resolve(*p));
                }
                Node::Object(spec) => {
                    for p in spec.props.iter_mut() {
                        p.node = resolve(p.node);
                    }
                    spec.additional = spec.additional.map(resolve);
                }
                Node::Union(alts) => {
                    for (_, a) in alts.iter_mut() {
                        *a = resolve(*a);
                    }
                }
                _ => {}
            }
        }
        let root = resolve(root);
        // `uniqueItems`: enforced over an enum's literals (Pydantic's `Set[Literal[…]]` or
        // `Set[SomeEnum]`); distinct values are then at most the literals.
        for (id, at) in std::mem::take(&mut self.unique_arrays) {
            let literals = match &self.nodes[id as usize] {
                Node::Array { items, prefix, .. } if prefix.is_empty() => {
                    match &self.nodes[*items as usize] {
                        Node::Enum(texts) if texts.len() <= MAX_UNIQUE_LITERALS => texts.len(),
                        _ => 0,
                    }
                }
                _ => 0,
            };
            if literals == 0 {
                return err(
                    &at,
                    format!("`uniqueItems` is supported on arrays whose items are one `enum` of at most {MAX_UNIQUE_LITERALS} values"),
                );
            }
            if let Node::Array {
                min_items,
                max_items,
                ..
            } = &mut self.nodes[id as usize]
            {
                if *min_items as usize > literals {
                    return err(
                        &at,
                        format!("`minItems` exceeds the {literals} distinct values"),
                    );
                }
                *max_items = Some(max_items.map_or(literals as u32, |m| m.min(literals as u32)));
            }
        }
        self.flatten_unions()?;
        let min_depth = min_depths(&self.nodes);
        if min_depth[root as usize] > MAX_DEPTH as u32 {
            return err(
                "",
                format!("the schema admits no value nested at most {MAX_DEPTH} deep"),
            );
        }
        for node in &mut self.nodes {
            if let Node::Object(spec) = node {
                let props = &spec.props;
                spec.windows = (0..=props.len())
                    .map(|next| {
                        let mut mask = 0u128;
                        for (i, p) in props.iter().enumerate().skip(next) {
                            if min_depth[p.node as usize] <= MAX_DEPTH as u32 {
                                mask |= 1 << i;
                            }
                            if p.required {
                                break;
                            }
                        }
                        mask
                    })
                    .collect();
                spec.required_from = (0..=props.len())
                    .map(|next| props[next..].iter().filter(|p| p.required).count() as u32)
                    .collect();
            }
        }
        Ok(Schema {
            nodes: self.nodes,
            min_depth,
            root,
        })
    }

    /// Unions of unions become one; each alternative gets the bytes it can start with, which
    /// must not overlap (the first byte of a value chooses its alternative).
    fn flatten_unions(&mut self) -> Result<(), SchemaError> {
        for id in 0..self.nodes.len() {
            let Node::Union(alts) = &self.nodes[id] else {
                continue;
            };
            let mut flat: Vec<NodeId> = Vec::new();
            let mut todo: Vec<NodeId> = alts.iter().map(|&(_, a)| a).collect();
            let mut seen = 0;
            while let Some(a) = todo.pop() {
                seen += 1;
                if seen > self.nodes.len() {
                    return err("", "`anyOf` alternatives refer to each other in a cycle");
                }
                match &self.nodes[a as usize] {
                    Node::Union(inner) => todo.extend(inner.iter().map(|&(_, x)| x)),
                    _ => flat.push(a),
                }
            }
            flat.reverse();
            // Pydantic's `Union[int, float]`: every integer is a number, so the number stands
            // for both.
            let any_number = |n: &Node| matches!(n, Node::Number { integer: false });
            if flat.iter().any(|&a| any_number(&self.nodes[a as usize])) {
                flat.retain(|&a| !matches!(self.nodes[a as usize], Node::Number { integer: true }));
            }
            let mut with_bytes: Vec<(ByteSet, NodeId)> = Vec::with_capacity(flat.len());
            for a in flat {
                let first = first_bytes(&self.nodes[a as usize]);
                if let Some((other, _)) = with_bytes.iter().find(|(b, _)| b & first != 0) {
                    let byte = (other & first).trailing_zeros() as u8 as char;
                    return err(
                        "",
                        format!(
                            "`anyOf`/`type` alternatives must start differently (two can \
                             start with {byte:?}); alternatives of different JSON types are supported"
                        ),
                    );
                }
                with_bytes.push((first, a));
            }
            self.nodes[id] = Node::Union(with_bytes);
        }
        Ok(())
    }
}

/// The ASCII bytes a value of `node` may start with (unions are flattened first).
fn first_bytes(node: &Node) -> ByteSet {
    let bits = |s: &[u8]| s.iter().fold(0u128, |m, &b| m | 1 << b);
    let number = bits(b"-0123456789");
    match node {
        Node::Any => bits(b"{[\"tfn") | number,
        Node::Null => bits(b"n"),
        Node::Boolean => bits(b"tf"),
        Node::Number { .. } | Node::Bounded(_) => number,
        Node::String { .. } | Node::Pattern(_) => bits(b"\""),
        Node::Array { .. } => bits(b"["),
        Node::Object(_) => bits(b"{"),
        Node::Enum(texts) => texts
            .iter()
            .filter_map(|t| t.first())
            .fold(0, |m, &b| m | 1u128 << (b & 0x7f)),
        Node::Union(alts) => alts.iter().fold(0, |m, (b, _)| m | b),
        Node::Alias(_) => 0,
    }
}

/// Fewest containers a value of each node needs open at once (`u32::MAX`: no finite value).
fn min_depths(nodes: &[Node]) -> Vec<u32> {
    let mut depth = vec![u32::MAX; nodes.len()];
    loop {
        let mut changed = false;
        for (id, node) in nodes.iter().enumerate() {
            let d = match node {
                Node::Any | Node::Null | Node::Boolean | Node::Number { .. } => 0,
                Node::Bounded(_) => 0,
                Node::String { .. } | Node::Pattern(_) | Node::Enum(_) => 0,
                Node::Array {
                    items,
                    prefix,
                    min_items,
                    ..
                } => {
                    // The items that must be written: the tuple's first ones, then the rest's.
                    let need = *min_items as usize;
                    let rest = if need > prefix.len() {
                        depth[*items as usize]
                    } else {
                        0
                    };
                    prefix
                        .iter()
                        .take(need)
                        .map(|p| depth[*p as usize])
                        .fold(rest, u32::max)
                        .saturating_add(1)
                }
                Node::Object(spec) => spec
                    .props
                    .iter()
                    .filter(|p| p.required)
                    .map(|p| depth[p.node as usize])
                    .max()
                    .unwrap_or(0)
                    .saturating_add(1),
                Node::Union(alts) => alts
                    .iter()
                    .map(|&(_, a)| depth[a as usize])
                    .min()
                    .unwrap_or(u32::MAX),
                Node::Alias(_) => u32::MAX,
            };
            if d < depth[id] {
                depth[id] = d;
                changed = true;
            }
        }
        if !changed {
            return depth;
        }
    }
}

fn infer_type(obj: &Map<String, Value>, at: &str) -> Result<Vec<String>, SchemaError> {
    let has = |kws: &[&str]| kws.iter().any(|k| obj.contains_key(*k));
    let kinds: Vec<&str> = [
        (OBJECT_KEYWORDS, "object"),
        (ARRAY_KEYWORDS, "array"),
        (STRING_KEYWORDS, "string"),
        (NUMBER_KEYWORDS, "number"),
    ]
    .iter()
    .filter(|(kws, _)| has(kws))
    .map(|&(_, kind)| kind)
    .collect();
    match kinds.as_slice() {
        [] => Ok(vec!["any".into()]),
        [one] => Ok(vec![(*one).into()]),
        _ => err(
            at,
            "keywords of several types without `type`: say which `type`",
        ),
    }
}

fn type_admits(t: &str, v: &Value) -> bool {
    match (t, v) {
        ("null", Value::Null) | ("boolean", Value::Bool(_)) | ("string", Value::String(_)) => true,
        ("number", Value::Number(_)) | ("array", Value::Array(_)) => true,
        ("object", Value::Object(_)) => true,
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

fn count(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<u32>, SchemaError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => err(&format!("{at}/{key}"), "must be a non-negative integer"),
        },
    }
}

fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}
