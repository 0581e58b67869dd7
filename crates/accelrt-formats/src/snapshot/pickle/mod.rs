//! A reader and a writer for the subset of Python's pickle format that memory snapshots use:
//! plain dicts, lists, tuples, strings, integers, floats, booleans and `None` (protocols
//! 2 to 5; no classes, no `GLOBAL`/`REDUCE`, so reading a file can never run code).
//!
//! The reader treats its input as hostile. Every malformed input — truncated data, an unknown
//! or unsupported opcode, a stack underflow, a missing `MARK`, a memo index that was never
//! stored, invalid UTF-8, an integer over 128 bits — is a [`PickleError`] naming the byte
//! offset and the opcode, never a panic. Containers live in an arena ([`Pickle`]) and refer to
//! each other by index, so shared and even cyclic references (legal in pickle) cost nothing
//! and dropping a deeply nested document cannot overflow the stack.
//!
//! The writer emits protocol 4 with the opcodes PyTorch's own memory visualiser
//! (`MemoryViz.js`) understands: `EMPTY_DICT`/`EMPTY_LIST` + `MARK` + `SETITEMS`/`APPENDS`
//! (batched by 1000, as CPython does), `BININT*`/`LONG1`, `BINFLOAT`, `(SHORT_)BINUNICODE`,
//! `TUPLE1-3`, and `MEMOIZE`/`BINGET` for repeated strings (stack frames repeat a lot).
//!
//! ```
//! use accelrt_formats::snapshot::pickle::{Pickle, PickleWriter};
//! let mut w = PickleWriter::new();
//! w.dict_begin();
//! w.str("size");
//! w.int(1 << 40);
//! w.dict_end();
//! let bytes = w.finish();
//! let p = Pickle::parse(&bytes).unwrap();
//! assert_eq!(p.get(p.root(), "size").and_then(|v| p.as_int(v)), Some(1 << 40));
//! ```

mod limits;
mod read;
#[cfg(test)]
mod tests;
mod write;

pub use limits::{
    PickleError, PickleFault, PickleLimits, MAX_DEPTH_ENV, MAX_OBJECTS_ENV, MAX_STRING_ENV,
};
pub use write::PickleWriter;

/// A pickled value. Scalars are held inline; strings and containers are indices into the
/// [`Pickle`] that produced them (read them with its accessors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// Python's `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer (pickle's `LONG1` holds at most 128 bits here).
    Int(i128),
    /// A float.
    Float(f64),
    /// A string: index into the document's strings.
    Str(u32),
    /// A list: index into the document's containers.
    List(u32),
    /// A tuple: index into the document's containers.
    Tuple(u32),
    /// A dict: index into the document's containers.
    Dict(u32),
}

impl Value {
    /// The arena index of a list, tuple or dict (unique within its [`Pickle`]): two values
    /// with the same id are the same Python object.
    pub fn container_id(self) -> Option<u32> {
        match self {
            Value::List(i) | Value::Tuple(i) | Value::Dict(i) => Some(i),
            _ => None,
        }
    }

    /// The Python type name, for messages (`int`, `str`, `list`, ...).
    pub fn type_name(self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
        }
    }
}

#[derive(Debug)]
enum Node {
    Seq(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

/// A parsed pickle: the root value and the arena its strings and containers live in.
#[derive(Debug)]
pub struct Pickle {
    strings: Vec<Box<str>>,
    nodes: Vec<Node>,
    root: Value,
}

/// The opcodes the reader and the writer share.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

impl Pickle {
    /// The unpickled object.
    pub fn root(&self) -> Value {
        self.root
    }

    /// The text of a string value.
    pub fn as_str(&self, v: Value) -> Option<&str> {
        match v {
            Value::Str(i) => self.strings.get(i as usize).map(|s| &**s),
            _ => None,
        }
    }

    /// An integer value (`bool` is not an integer here).
    pub fn as_int(&self, v: Value) -> Option<i128> {
        match v {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The items of a list or a tuple.
    pub fn as_seq(&self, v: Value) -> Option<&[Value]> {
        match v {
            Value::List(i) | Value::Tuple(i) => match self.nodes.get(i as usize) {
                Some(Node::Seq(items)) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// The key/value pairs of a dict, in insertion order (a repeated key appears twice; the
    /// last one wins, as in Python).
    pub fn as_dict(&self, v: Value) -> Option<&[(Value, Value)]> {
        match v {
            Value::Dict(i) => match self.nodes.get(i as usize) {
                Some(Node::Dict(pairs)) => Some(pairs),
                _ => None,
            },
            _ => None,
        }
    }

    /// `dict[key]` for a string key (the last occurrence wins); `None` when `dict` is not a
    /// dict or has no such key.
    pub fn get(&self, dict: Value, key: &str) -> Option<Value> {
        self.as_dict(dict)?
            .iter()
            .rev()
            .find(|(k, _)| self.as_str(*k) == Some(key))
            .map(|&(_, v)| v)
    }

    /// The value as JSON: `None` → null, tuples → arrays, non-string dict keys → their JSON
    /// text. Input is untrusted (it may be cyclic, or share one list many times): nesting
    /// deeper than `max_depth`, and everything past the first 100,000 values, becomes null.
    pub fn to_json(&self, v: Value, max_depth: usize) -> serde_json::Value {
        let mut budget = 100_000usize;
        self.to_json_within(v, max_depth, &mut budget)
    }

    fn to_json_within(&self, v: Value, depth: usize, budget: &mut usize) -> serde_json::Value {
        use serde_json::Value as J;
        if depth == 0 || *budget == 0 {
            return J::Null;
        }
        *budget -= 1;
        match v {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(b),
            Value::Int(i) => i64::try_from(i)
                .map(J::from)
                .or_else(|_| u64::try_from(i).map(J::from))
                .unwrap_or_else(|_| J::String(i.to_string())),
            Value::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
            Value::Str(_) => J::String(self.as_str(v).unwrap_or_default().to_string()),
            Value::List(_) | Value::Tuple(_) => J::Array(
                self.as_seq(v)
                    .unwrap_or_default()
                    .iter()
                    .map(|&x| self.to_json_within(x, depth - 1, budget))
                    .collect(),
            ),
            Value::Dict(_) => {
                let mut map = serde_json::Map::new();
                for &(k, x) in self.as_dict(v).unwrap_or_default() {
                    let key = match self.as_str(k) {
                        Some(s) => s.to_string(),
                        None => self.to_json_within(k, 2, budget).to_string(),
                    };
                    map.insert(key, self.to_json_within(x, depth - 1, budget));
                }
                J::Object(map)
            }
        }
    }
}
