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

use std::collections::HashMap;

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

/// Why a pickle could not be read: the byte offset of the opcode and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Offset of the opcode (or of the end of the data) in the input.
    pub offset: usize,
    /// What was wrong, and what was expected.
    pub message: String,
    /// Which kind of fault it is (callers word their advice by it).
    pub fault: PickleFault,
}

/// The kinds of [`PickleError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickleFault {
    /// Not a well-formed pickle: truncated, corrupt, or not a pickle at all.
    Malformed,
    /// A well-formed opcode refused on purpose: it would import a Python callable, call one,
    /// or build an object (`GLOBAL`, `REDUCE`, `NEWOBJ`, ...), which a memory snapshot never
    /// needs and which `pickle.load` would run code for.
    Refused,
    /// A well-formed opcode outside the subset snapshots use (bytes, sets, protocol 0/1 text
    /// opcodes).
    Unsupported,
    /// A resource limit of [`PickleLimits`] was reached; the message names it and how to
    /// raise it.
    Limit,
}

/// Caps on what reading one pickle may build, so that memory follows these limits and not
/// the input: a small file of nested empty lists would otherwise cost about 90 bytes of
/// memory per input byte. The defaults hold any real memory snapshot with room to spare; each
/// can be raised with its environment variable (read by [`PickleLimits::from_env`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickleLimits {
    /// Values created (each push: scalars, strings, containers, memo references) plus memo
    /// entries; each costs up to about 70 bytes. Default 10,000,000 (under 700 MiB).
    pub max_objects: u64,
    /// Containers nested inside each other, and MARKs open at once. Default 512 (real
    /// snapshots nest about 6 deep).
    pub max_depth: u32,
    /// Bytes of one string. Default 1 MiB (real snapshots hold names and paths).
    pub max_string_bytes: u64,
}

/// Environment variable raising [`PickleLimits::max_objects`].
pub const MAX_OBJECTS_ENV: &str = "ACCELRT_PICKLE_MAX_OBJECTS";
/// Environment variable raising [`PickleLimits::max_depth`].
pub const MAX_DEPTH_ENV: &str = "ACCELRT_PICKLE_MAX_DEPTH";
/// Environment variable raising [`PickleLimits::max_string_bytes`].
pub const MAX_STRING_ENV: &str = "ACCELRT_PICKLE_MAX_STRING_BYTES";

impl Default for PickleLimits {
    fn default() -> Self {
        PickleLimits {
            max_objects: 10_000_000,
            max_depth: 512,
            max_string_bytes: 1 << 20,
        }
    }
}

impl PickleLimits {
    /// The defaults, with any of [`MAX_OBJECTS_ENV`], [`MAX_DEPTH_ENV`] and
    /// [`MAX_STRING_ENV`] that is set taking their place. A value that is not a positive
    /// integer is an error naming the variable.
    pub fn from_env() -> Result<PickleLimits, String> {
        fn read(name: &str, default: u64) -> Result<u64, String> {
            match std::env::var(name) {
                Err(std::env::VarError::NotPresent) => Ok(default),
                Err(std::env::VarError::NotUnicode(v)) => {
                    Err(format!("{name}={v:?} is not a positive integer"))
                }
                Ok(v) => match v.trim().replace('_', "").parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!(
                        "{name}={v:?} is not a positive integer (the default is {default})"
                    )),
                },
            }
        }
        let d = PickleLimits::default();
        Ok(PickleLimits {
            max_objects: read(MAX_OBJECTS_ENV, d.max_objects)?,
            max_depth: u32::try_from(read(MAX_DEPTH_ENV, d.max_depth.into())?)
                .map_err(|_| format!("{MAX_DEPTH_ENV} is over {}", u32::MAX))?,
            max_string_bytes: read(MAX_STRING_ENV, d.max_string_bytes)?,
        })
    }
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for PickleError {}

/// Largest integer a `LONG1` may encode here (bytes).
const MAX_LONG_BYTES: usize = 16;

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

/// The name of an opcode the reader does not accept, for messages, and whether it is refused
/// (it would import, call or build a Python object) or merely outside the subset.
fn unsupported_name(code: u8) -> Option<(&'static str, PickleFault)> {
    let refused = match code {
        b'c' => Some("GLOBAL"),
        0x93 => Some("STACK_GLOBAL"),
        b'R' => Some("REDUCE"),
        b'b' => Some("BUILD"),
        0x81 => Some("NEWOBJ"),
        0x92 => Some("NEWOBJ_EX"),
        b'i' => Some("INST"),
        b'o' => Some("OBJ"),
        b'P' => Some("PERSID"),
        b'Q' => Some("BINPERSID"),
        0x82..=0x84 => Some("EXT1/EXT2/EXT4"),
        _ => None,
    };
    if let Some(name) = refused {
        return Some((name, PickleFault::Refused));
    }
    Some((
        match code {
            b'B' | b'C' | 0x8e => "BINBYTES",
            0x96 => "BYTEARRAY8",
            0x97 | 0x98 => "NEXT_BUFFER/READONLY_BUFFER",
            0x8f => "EMPTY_SET",
            0x90 => "ADDITEMS",
            0x91 => "FROZENSET",
            0x8b => "LONG4",
            b'I' | b'L' | b'F' | b'S' | b'T' | b'U' | b'V' | b'g' | b'p' => {
                "a protocol-0/1 text opcode"
            }
            _ => return None,
        },
        PickleFault::Unsupported,
    ))
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed.
    at: usize,
    code: u8,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    strings: Vec<Box<str>>,
    nodes: Vec<Node>,
    /// Nesting depth of each node, as built (1: holds no container).
    depths: Vec<u32>,
    limits: PickleLimits,
    /// Values pushed plus memo entries made, against `limits.max_objects`.
    objects: u64,
}

impl<'a> Reader<'a> {
    fn err(&self, message: impl Into<String>) -> PickleError {
        self.fault(PickleFault::Malformed, message)
    }

    fn fault(&self, fault: PickleFault, message: impl Into<String>) -> PickleError {
        PickleError {
            offset: self.at,
            message: format!("opcode 0x{:02x}: {}", self.code, message.into()),
            fault,
        }
    }

    fn limit(&self, what: String, value: u64, env: &str) -> PickleError {
        self.fault(
            PickleFault::Limit,
            format!(
                "{what} (the limit is {value}: raise it with {env}=N if the file is a genuine \
                 snapshot)"
            ),
        )
    }

    /// Count one more value (or memo entry) against the object limit.
    #[inline]
    fn count(&mut self) -> Result<(), PickleError> {
        self.objects += 1;
        if self.objects > self.limits.max_objects {
            return Err(self.limit(
                format!("more than {} objects", self.limits.max_objects),
                self.limits.max_objects,
                MAX_OBJECTS_ENV,
            ));
        }
        Ok(())
    }

    #[inline]
    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        self.count()?;
        self.stack.push(v);
        Ok(())
    }

    fn depth_of(&self, v: Value) -> u32 {
        v.container_id()
            .and_then(|i| self.depths.get(i as usize))
            .copied()
            .unwrap_or(0)
    }

    /// The deepest of `items` (0 when none is a container).
    fn inner_depth(&self, items: impl IntoIterator<Item = Value>) -> u32 {
        items
            .into_iter()
            .map(|v| self.depth_of(v))
            .max()
            .unwrap_or(0)
    }

    /// Record that container `id` now holds items `inner` deep: it is at least one deeper.
    fn deepen(&mut self, id: u32, inner: u32) -> Result<(), PickleError> {
        let depth = inner.saturating_add(1).max(self.depths[id as usize]);
        if depth > self.limits.max_depth {
            return Err(self.limit(
                format!("containers nested more than {} deep", self.limits.max_depth),
                self.limits.max_depth.into(),
                MAX_DEPTH_ENV,
            ));
        }
        self.depths[id as usize] = depth;
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| PickleError {
                offset: self.at,
                fault: PickleFault::Malformed,
                message: format!(
                    "opcode 0x{:02x}: the data ends inside its {what} ({n} byte(s) needed, {} left): \
                     the file is truncated",
                    self.code,
                    self.data.len() - self.pos
                ),
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, PickleError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, PickleError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, PickleError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, PickleError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("pops past a MARK: the stack is malformed"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err("the stack is empty (stack underflow)"))
    }

    fn top(&self) -> Result<Value, PickleError> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("the stack is empty (stack underflow)"))
    }

    /// Everything above the last MARK, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK before it"))?;
        Ok(self.stack.split_off(mark))
    }

    fn push_node(&mut self, node: Node, kind: fn(u32) -> Value) -> Result<(), PickleError> {
        let id =
            u32::try_from(self.nodes.len()).map_err(|_| self.err("more than 2^32 containers"))?;
        self.count()?;
        let inner = match &node {
            Node::Seq(items) => self.inner_depth(items.iter().copied()),
            Node::Dict(pairs) => self.inner_depth(pairs.iter().map(|&(_, v)| v)),
        };
        self.nodes.push(node);
        self.depths.push(1);
        self.deepen(id, inner)?;
        self.stack.push(kind(id));
        Ok(())
    }

    /// The length of a string about to be read, checked against the string limit.
    fn string_len(&self, n: u64) -> Result<usize, PickleError> {
        // Past the end of the data is truncation (reported by `take`), not a long string.
        if n > self.limits.max_string_bytes && n <= (self.data.len() - self.pos) as u64 {
            return Err(self.limit(
                format!(
                    "a string of {n} bytes is longer than {} bytes",
                    self.limits.max_string_bytes
                ),
                self.limits.max_string_bytes,
                MAX_STRING_ENV,
            ));
        }
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn push_str(&mut self, bytes: &[u8]) -> Result<(), PickleError> {
        let s = std::str::from_utf8(bytes)
            .map_err(|e| self.err(format!("the string is not valid UTF-8 ({e})")))?;
        let id =
            u32::try_from(self.strings.len()).map_err(|_| self.err("more than 2^32 strings"))?;
        self.count()?;
        self.strings.push(s.into());
        self.stack.push(Value::Str(id));
        Ok(())
    }

    fn container_below(&self, index: Option<usize>, want: &str) -> Result<u32, PickleError> {
        let v = index
            .filter(|&i| self.marks.last().is_none_or(|&m| i >= m))
            .and_then(|i| self.stack.get(i).copied())
            .ok_or_else(|| self.err(format!("no {want} below the items")))?;
        match (v, want) {
            (Value::List(id), "list") | (Value::Dict(id), "dict") => Ok(id),
            _ => Err(self.err(format!(
                "expects a {want} below the items, found a {}",
                v.type_name()
            ))),
        }
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let v = *self.memo.get(&key).ok_or_else(|| {
            self.err(format!(
                "memo entry {key} was never stored (no PUT/MEMOIZE for it)"
            ))
        })?;
        self.push(v)
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let v = self.top()?;
        if self.memo.insert(key, v).is_none() {
            self.count()?;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                return Err(PickleError {
                    offset: self.pos,
                    fault: PickleFault::Malformed,
                    message: if self.pos == 0 {
                        "the file is empty: expected a pickle (starting with the PROTO opcode 0x80)"
                            .into()
                    } else {
                        "the data ends before the STOP opcode: the file is truncated".into()
                    },
                });
            };
            self.code = code;
            self.pos += 1;
            if self.at == 0 && code != op::PROTO {
                return Err(self.err(
                    "not a pickle of protocol 2 or later: it must start with the PROTO opcode \
                     0x80 (torch.cuda.memory._dump_snapshot() writes protocol 4)",
                ));
            }
            match code {
                op::PROTO => {
                    let v = self.u8("protocol number")?;
                    if !(2..=5).contains(&v) {
                        return Err(self.err(format!("protocol {v} is not supported (2 to 5 are)")));
                    }
                }
                op::FRAME => {
                    let n = self.u64("frame length")?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return Err(self.err(format!(
                            "FRAME announces {n} bytes but only {} are left: the file is truncated",
                            self.data.len() - self.pos
                        )));
                    }
                }
                op::STOP => {
                    let v = self.pop()?;
                    if !self.marks.is_empty() {
                        return Err(self.err("STOP with an unclosed MARK"));
                    }
                    return Ok(v);
                }
                op::MARK => {
                    if self.marks.len() >= self.limits.max_depth as usize {
                        return Err(self.limit(
                            format!("more than {} MARKs open at once", self.limits.max_depth),
                            self.limits.max_depth.into(),
                            MAX_DEPTH_ENV,
                        ));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?;
                    self.push(v)?;
                }
                op::NONE => self.push(Value::None)?,
                op::NEWTRUE => self.push(Value::Bool(true))?,
                op::NEWFALSE => self.push(Value::Bool(false))?,
                op::BININT => {
                    let v = self.u32("4-byte integer")? as i32;
                    self.push(Value::Int(v.into()))?;
                }
                op::BININT1 => {
                    let v = self.u8("1-byte integer")?;
                    self.push(Value::Int(v.into()))?;
                }
                op::BININT2 => {
                    let v = self.u16("2-byte integer")?;
                    self.push(Value::Int(v.into()))?;
                }
                op::LONG1 => {
                    let n = self.u8("LONG1 length")? as usize;
                    if n > MAX_LONG_BYTES {
                        return Err(self.err(format!(
                            "integer of {n} bytes is too large (at most {MAX_LONG_BYTES} bytes)"
                        )));
                    }
                    let bytes = self.take(n, "LONG1 integer")?;
                    let mut value: i128 = 0;
                    for (i, &b) in bytes.iter().enumerate() {
                        value |= (b as i128) << (8 * i);
                    }
                    // Sign-extend from the top byte (two's complement, little endian).
                    if n > 0 && n < MAX_LONG_BYTES && bytes[n - 1] & 0x80 != 0 {
                        value -= 1i128 << (8 * n);
                    }
                    self.push(Value::Int(value))?;
                }
                op::BINFLOAT => {
                    let b = self.take(8, "float")?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8("string length")?;
                    let n = self.string_len(n.into())?;
                    let s = self.take(n, "string")?;
                    self.push_str(s)?;
                }
                op::BINUNICODE => {
                    let n = self.u32("string length")?;
                    let n = self.string_len(n.into())?;
                    let s = self.take(n, "string")?;
                    self.push_str(s)?;
                }
                op::BINUNICODE8 => {
                    let n = self.u64("string length")?;
                    let n = self.string_len(n)?;
                    let s = self.take(n, "string")?;
                    self.push_str(s)?;
                }
                op::EMPTY_DICT => self.push_node(Node::Dict(Vec::new()), Value::Dict)?,
                op::EMPTY_LIST => self.push_node(Node::Seq(Vec::new()), Value::List)?,
                op::EMPTY_TUPLE => self.push_node(Node::Seq(Vec::new()), Value::Tuple)?,
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_node(Node::Seq(items), Value::Tuple)?;
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Seq(items), Value::Tuple)?;
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Seq(items), Value::List)?;
                }
                op::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_node(Node::Dict(pairs), Value::Dict)?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let id = self.container_below(self.stack.len().checked_sub(1), "list")?;
                    self.deepen(id, self.depth_of(v))?;
                    if let Node::Seq(items) = &mut self.nodes[id as usize] {
                        items.push(v);
                    }
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    let id = self.container_below(self.stack.len().checked_sub(1), "list")?;
                    self.deepen(id, self.inner_depth(items.iter().copied()))?;
                    if let Node::Seq(list) = &mut self.nodes[id as usize] {
                        list.extend(items);
                    }
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let id = self.container_below(self.stack.len().checked_sub(1), "dict")?;
                    let pair = self.pairs(vec![k, v])?;
                    self.deepen(id, self.depth_of(v))?;
                    if let Node::Dict(d) = &mut self.nodes[id as usize] {
                        d.extend(pair);
                    }
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let id = self.container_below(self.stack.len().checked_sub(1), "dict")?;
                    let pairs = self.pairs(items)?;
                    self.deepen(id, self.inner_depth(pairs.iter().map(|&(_, v)| v)))?;
                    if let Node::Dict(d) = &mut self.nodes[id as usize] {
                        d.extend(pairs);
                    }
                }
                op::MEMOIZE => {
                    let key = u32::try_from(self.memo.len())
                        .map_err(|_| self.err("more than 2^32 memo entries"))?;
                    self.memo_put(key)?;
                }
                op::BINPUT => {
                    let key = self.u8("memo index")?;
                    self.memo_put(key.into())?;
                }
                op::LONG_BINPUT => {
                    let key = self.u32("memo index")?;
                    self.memo_put(key)?;
                }
                op::BINGET => {
                    let key = self.u8("memo index")?;
                    self.memo_get(key.into())?;
                }
                op::LONG_BINGET => {
                    let key = self.u32("memo index")?;
                    self.memo_get(key)?;
                }
                other => {
                    return Err(match unsupported_name(other) {
                        Some((name, PickleFault::Refused)) => self.fault(
                            PickleFault::Refused,
                            format!(
                                "{name} refused: it imports, calls or builds a Python object, \
                                 which loading the file in Python would run code for; memory \
                                 snapshots hold only dicts, lists, tuples, strings, numbers, \
                                 booleans and None"
                            ),
                        ),
                        Some((name, _)) if name.starts_with("a protocol-0/1") => self.fault(
                            PickleFault::Unsupported,
                            format!(
                                "{name} is not supported: snapshots are written with protocol \
                                 2 or later"
                            ),
                        ),
                        Some((name, _)) => self.fault(
                            PickleFault::Unsupported,
                            format!(
                                "{name} is not supported: memory snapshots hold only dicts, \
                                 lists, tuples, strings, numbers, booleans and None"
                            ),
                        ),
                        None => self.err(
                            "unknown opcode: this is not a pickle, or it is corrupt".to_string(),
                        ),
                    })
                }
            }
        }
    }

    /// Key/value pairs from a flat list; dict keys must be hashable scalars or strings.
    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
        if items.len() % 2 != 0 {
            return Err(self.err(format!(
                "{} item(s) for a dict: keys and values must come in pairs",
                items.len()
            )));
        }
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if matches!(k, Value::List(_) | Value::Dict(_)) {
                return Err(self.err(format!("a {} cannot be a dict key", k.type_name())));
            }
            out.push((k, v));
        }
        Ok(out)
    }
}

impl Pickle {
    /// Parse a pickle held in memory, within the limits [`PickleLimits::from_env`] gives.
    /// Bytes after the `STOP` opcode are ignored, as Python's `pickle.loads` does.
    pub fn parse(data: &[u8]) -> Result<Pickle, PickleError> {
        let limits = PickleLimits::from_env().map_err(|message| PickleError {
            offset: 0,
            message,
            fault: PickleFault::Limit,
        })?;
        Self::parse_with(data, limits)
    }

    /// Parse a pickle held in memory within `limits`.
    pub fn parse_with(data: &[u8], limits: PickleLimits) -> Result<Pickle, PickleError> {
        let mut r = Reader {
            data,
            pos: 0,
            at: 0,
            code: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            strings: Vec::new(),
            nodes: Vec::new(),
            depths: Vec::new(),
            limits,
            objects: 0,
        };
        let root = r.run()?;
        Ok(Pickle {
            strings: r.strings,
            nodes: r.nodes,
            root,
        })
    }

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

/// Items per `APPENDS`/`SETITEMS` batch (CPython's `_BATCHSIZE`; also keeps JavaScript
/// readers, which spread a batch into a call, within their argument limits).
const BATCH: usize = 1000;

#[derive(Clone, Copy)]
enum Open {
    List(usize),
    Dict(usize),
}

/// A streaming protocol-4 pickle writer. Build containers with `*_begin`/`*_end` around
/// their items (dict items: key then value), then [`PickleWriter::finish`].
///
/// Misuse (an unclosed container at `finish`, `dict_end` on a list, an odd number of dict
/// items) is a programming error and panics.
pub struct PickleWriter {
    out: Vec<u8>,
    strings: HashMap<Box<str>, u32>,
    memo_len: u32,
    /// Open containers and the number of items written into the current batch.
    open: Vec<Open>,
}

impl Default for PickleWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PickleWriter {
    /// A writer with the protocol header written.
    pub fn new() -> Self {
        PickleWriter {
            out: vec![op::PROTO, 4],
            strings: HashMap::new(),
            memo_len: 0,
            open: Vec::new(),
        }
    }

    fn item(&mut self) {
        let (batched, op_close) = match self.open.last_mut() {
            Some(Open::List(n)) => {
                *n += 1;
                (*n == BATCH, op::APPENDS)
            }
            Some(Open::Dict(n)) => {
                *n += 1;
                (*n == 2 * BATCH, op::SETITEMS)
            }
            None => (false, 0),
        };
        if batched {
            self.out.push(op_close);
            self.out.push(op::MARK);
            if let Some(Open::List(n) | Open::Dict(n)) = self.open.last_mut() {
                *n = 0;
            }
        }
    }

    /// `None`.
    pub fn none(&mut self) {
        self.out.push(op::NONE);
        self.item();
    }

    /// `True` / `False`.
    pub fn bool(&mut self, b: bool) {
        self.out.push(if b { op::NEWTRUE } else { op::NEWFALSE });
        self.item();
    }

    /// An integer, in the shortest encoding.
    pub fn int(&mut self, v: i128) {
        if (0..=0xff).contains(&v) {
            self.out.extend([op::BININT1, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend((v as u16).to_le_bytes());
        } else if (i32::MIN as i128..=i32::MAX as i128).contains(&v) {
            self.out.push(op::BININT);
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // Minimal two's complement, little endian.
            let bytes = v.to_le_bytes();
            let mut n = bytes.len();
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend([op::LONG1, n as u8]);
            self.out.extend(&bytes[..n]);
        }
        self.item();
    }

    /// A float.
    pub fn float(&mut self, v: f64) {
        self.out.push(op::BINFLOAT);
        self.out.extend(v.to_be_bytes());
        self.item();
    }

    /// A string; a string written before is referenced from the memo instead of repeated.
    pub fn str(&mut self, s: &str) {
        if let Some(&i) = self.strings.get(s) {
            if let Ok(i) = u8::try_from(i) {
                self.out.extend([op::BINGET, i]);
            } else {
                self.out.push(op::LONG_BINGET);
                self.out.extend(i.to_le_bytes());
            }
        } else {
            if let Ok(n) = u8::try_from(s.len()) {
                self.out.extend([op::SHORT_BINUNICODE, n]);
            } else {
                let n = u32::try_from(s.len()).expect("strings over 4 GiB are not written");
                self.out.push(op::BINUNICODE);
                self.out.extend(n.to_le_bytes());
            }
            self.out.extend(s.as_bytes());
            self.out.push(op::MEMOIZE);
            self.strings.insert(s.into(), self.memo_len);
            self.memo_len += 1;
        }
        self.item();
    }

    /// A tuple of two integers (PyTorch's `segment_pool_id`).
    pub fn int_pair(&mut self, a: i128, b: i128) {
        self.open.push(Open::List(0)); // items inside do not batch
        self.int(a);
        self.int(b);
        self.open.pop();
        self.out.push(op::TUPLE2);
        self.item();
    }

    /// Start a list; write its items, then [`PickleWriter::list_end`].
    pub fn list_begin(&mut self) {
        self.out.extend([op::EMPTY_LIST, op::MARK]);
        self.open.push(Open::List(0));
    }

    /// Close the innermost list.
    pub fn list_end(&mut self) {
        match self.open.pop() {
            Some(Open::List(_)) => self.out.push(op::APPENDS),
            _ => panic!("PickleWriter::list_end without an open list"),
        }
        self.item();
    }

    /// Start a dict; write key, value, key, value..., then [`PickleWriter::dict_end`].
    pub fn dict_begin(&mut self) {
        self.out.extend([op::EMPTY_DICT, op::MARK]);
        self.open.push(Open::Dict(0));
    }

    /// Close the innermost dict.
    pub fn dict_end(&mut self) {
        match self.open.pop() {
            Some(Open::Dict(n)) => {
                assert!(n % 2 == 0, "PickleWriter: a dict needs key/value pairs");
                self.out.push(op::SETITEMS);
            }
            _ => panic!("PickleWriter::dict_end without an open dict"),
        }
        self.item();
    }

    /// Write a JSON value: null → None, arrays → lists, objects → dicts (string keys).
    pub fn json(&mut self, v: &serde_json::Value) {
        use serde_json::Value as J;
        match v {
            J::Null => self.none(),
            J::Bool(b) => self.bool(*b),
            J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => self.int(i.into()),
                (None, Some(u), _) => self.int(u.into()),
                (_, _, Some(f)) => self.float(f),
                _ => self.none(),
            },
            J::String(s) => self.str(s),
            J::Array(items) => {
                self.list_begin();
                for x in items {
                    self.json(x);
                }
                self.list_end();
            }
            J::Object(map) => {
                self.dict_begin();
                for (k, x) in map {
                    self.str(k);
                    self.json(x);
                }
                self.dict_end();
            }
        }
    }

    /// The finished pickle (with `STOP`).
    pub fn finish(mut self) -> Vec<u8> {
        assert!(
            self.open.is_empty(),
            "PickleWriter::finish with {} unclosed container(s)",
            self.open.len()
        );
        self.out.push(op::STOP);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_at_every_width() {
        let cases: [i128; 16] = [
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -128,
            -129,
            i32::MAX as i128,
            i32::MIN as i128,
            i32::MAX as i128 + 1,
            i32::MIN as i128 - 1,
            u64::MAX as i128,
            i64::MIN as i128,
            1 << 100,
        ];
        for v in cases {
            let mut w = PickleWriter::new();
            w.int(v);
            let p = Pickle::parse(&w.finish()).unwrap();
            assert_eq!(p.as_int(p.root()), Some(v), "{v}");
        }
    }

    #[test]
    fn big_lists_and_dicts_are_batched() {
        let mut w = PickleWriter::new();
        w.dict_begin();
        for i in 0..2500 {
            w.str(&format!("k{i}"));
            w.list_begin();
            for j in 0..(i % 3) {
                w.int(j);
            }
            w.list_end();
        }
        w.str("long");
        w.list_begin();
        for j in 0..2345 {
            w.int(j);
        }
        w.list_end();
        w.dict_end();
        let bytes = w.finish();
        let p = Pickle::parse(&bytes).unwrap();
        assert_eq!(p.as_dict(p.root()).unwrap().len(), 2501);
        let long = p.get(p.root(), "long").unwrap();
        let items = p.as_seq(long).unwrap();
        assert_eq!(items.len(), 2345);
        assert_eq!(p.as_int(items[2344]), Some(2344));
        assert_eq!(p.as_seq(p.get(p.root(), "k2").unwrap()).unwrap().len(), 2);
    }

    #[test]
    fn repeated_strings_come_from_the_memo() {
        let mut w = PickleWriter::new();
        w.list_begin();
        for _ in 0..300 {
            w.str("a fairly long stack frame name that repeats");
        }
        w.list_end();
        let bytes = w.finish();
        assert!(bytes.len() < 300 * 6 + 100, "{} bytes", bytes.len());
        let p = Pickle::parse(&bytes).unwrap();
        let items = p.as_seq(p.root()).unwrap();
        assert_eq!(items.len(), 300);
        assert!(items
            .iter()
            .all(|&v| p.as_str(v) == Some("a fairly long stack frame name that repeats")));
    }

    #[test]
    fn hostile_inputs_are_errors() {
        // (input, expected fragment of the message)
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"\x80\x04", "truncated"),
            (b"\x80\x09N.", "protocol 9"),
            (b"\x80\x04\x8c\x05ab", "truncated"),
            (b"\x80\x04X\xff\xff\xff\xff", "truncated"),
            (b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff", "truncated"),
            (
                b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.",
                "FRAME announces",
            ),
            (b"\x80\x04.", "stack underflow"),
            (b"\x80\x04a.", "stack underflow"),
            (b"\x80\x04]Na]Na", "truncated"),
            (b"\x80\x04Nu.", "no MARK"),
            (b"\x80\x04(N.", "MARK"),
            (b"\x80\x04}(Nu.", "pairs"),
            (b"\x80\x04N(Ne.", "expects a list"),
            (b"\x80\x04h\x07.", "memo entry 7"),
            (b"\x80\x04\x8c\x02\xff\xfe.", "UTF-8"),
            (b"\x80\x04cos\nsystem\n.", "GLOBAL refused"),
            (b"\x80\x04\x8a\x20", "too large"),
            (b"\x80\x04\xfe", "unknown opcode"),
            (b"\x80\x04}]]s.", "cannot be a dict key"),
            (b"garbage!", "must start with the PROTO opcode"),
            (b"\x80\x04g0\n.", "protocol-0/1 text opcode"),
        ];
        for (input, want) in cases {
            let e = Pickle::parse(input).unwrap_err();
            assert!(
                e.to_string().contains(want),
                "{input:?}: wanted '{want}' in: {e}"
            );
        }
    }

    #[test]
    fn deep_and_cyclic_documents_are_harmless() {
        // A list that contains itself (legal pickle), and 200,000 nested tuples (within a
        // raised depth limit).
        let p = Pickle::parse(b"\x80\x04]\x94h\x00a.").unwrap();
        let items = p.as_seq(p.root()).unwrap();
        assert_eq!(items, &[p.root()]);
        assert_eq!(p.to_json(p.root(), 4).to_string(), "[[[[null]]]]");
        let mut deep = b"\x80\x04N".to_vec();
        deep.extend(std::iter::repeat_n(op::TUPLE1, 200_000));
        deep.push(op::STOP);
        let limits = PickleLimits {
            max_depth: 300_000,
            ..PickleLimits::default()
        };
        let p = Pickle::parse_with(&deep, limits).unwrap();
        assert!(p.as_seq(p.root()).is_some());
        drop(p);
    }

    fn nested(open: &[u8], close: &[u8], n: usize) -> Vec<u8> {
        let mut v = b"\x80\x04".to_vec();
        for _ in 0..n {
            v.extend(open);
        }
        v.push(op::NONE);
        for _ in 0..n {
            v.extend(close);
        }
        v.push(op::STOP);
        v
    }

    /// Issue 13 item 6: memory follows the limits, not the input. Each limit is an error
    /// naming it and the variable that raises it; just under a limit reads fine.
    #[test]
    fn every_resource_is_capped_with_a_named_limit() {
        let small = PickleLimits {
            max_objects: 1000,
            max_depth: 8,
            max_string_bytes: 16,
        };
        let many_items = {
            let mut v = b"\x80\x04](".to_vec();
            v.extend(std::iter::repeat_n(op::NONE, 2000));
            v.extend([op::APPENDS, op::STOP]);
            v
        };
        let many_memos = {
            let mut v = b"\x80\x04N".to_vec();
            v.extend(std::iter::repeat_n(op::MEMOIZE, 2000));
            v.push(op::STOP);
            v
        };
        let long_string = {
            let mut v = b"\x80\x04\x8c\x11".to_vec();
            v.extend([b'x'; 17]);
            v.push(op::STOP);
            v
        };
        // (input, fragment naming the limit, environment variable)
        let over: [(Vec<u8>, &str, &str); 6] = [
            (many_items, "more than 1000 objects", MAX_OBJECTS_ENV),
            (many_memos, "more than 1000 objects", MAX_OBJECTS_ENV),
            (
                nested(&[op::MARK], &[op::TUPLE], 9),
                "MARKs open",
                MAX_DEPTH_ENV,
            ),
            // EMPTY_LIST MARK ... APPENDS: how PyTorch's files nest
            (
                nested(&[op::EMPTY_LIST, op::MARK], &[op::APPENDS], 9),
                "MARKs open",
                MAX_DEPTH_ENV,
            ),
            (
                nested(&[], &[op::TUPLE1], 9),
                "nested more than 8 deep",
                MAX_DEPTH_ENV,
            ),
            (long_string, "a string of 17 bytes", MAX_STRING_ENV),
        ];
        for (input, want, env) in over {
            let e = Pickle::parse_with(&input, small).unwrap_err();
            assert_eq!(e.fault, PickleFault::Limit, "{e}");
            let text = e.to_string();
            assert!(text.contains(want), "'{want}' in: {text}");
            assert!(text.contains(env), "names {env}: {text}");
        }
        // Just under each limit.
        assert!(Pickle::parse_with(&nested(&[], &[op::TUPLE1], 8), small).is_ok());
        assert!(Pickle::parse_with(&nested(&[op::MARK], &[op::TUPLE], 7), small).is_ok());
        let mut s16 = b"\x80\x04\x8c\x10".to_vec();
        s16.extend([b'x'; 16]);
        s16.push(op::STOP);
        assert!(Pickle::parse_with(&s16, small).is_ok());
    }

    /// Issue 13 item 7: a refused opcode says it was refused, and why; a corrupt file says
    /// it is corrupt.
    #[test]
    fn refusals_are_told_apart_from_corruption() {
        // (input, fault)
        let cases: [(&[u8], PickleFault); 8] = [
            (b"\x80\x04cos\nsystem\n(S'id'\ntR.", PickleFault::Refused),
            (
                b"\x80\x04\x8c\x02os\x8c\x06system\x93.",
                PickleFault::Refused,
            ),
            (b"\x80\x04(cos\nsystem\nS'id'\ni.", PickleFault::Refused),
            (b"\x80\x04N\x81.", PickleFault::Refused),
            (b"\x80\x04C\x01x.", PickleFault::Unsupported),
            (b"\x80\x04\x8f.", PickleFault::Unsupported),
            (b"\x80\x04\xfe", PickleFault::Malformed),
            (b"\x80\x04]", PickleFault::Malformed),
        ];
        for (input, fault) in cases {
            let e = Pickle::parse(input).unwrap_err();
            assert_eq!(e.fault, fault, "{input:?}: {e}");
            if fault == PickleFault::Refused {
                assert!(e.message.contains("refused"), "{e}");
            }
        }
    }

    #[test]
    fn json_values_round_trip() {
        let v = serde_json::json!({"a": [1, -2, 3.5, "x", null, true], "b": {"c": 18446744073709551615u64}});
        let mut w = PickleWriter::new();
        w.json(&v);
        let p = Pickle::parse(&w.finish()).unwrap();
        assert_eq!(p.to_json(p.root(), 16), v);
    }
}
