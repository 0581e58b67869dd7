//! The reader: a small pickle VM over hostile input, building the [`Pickle`] arena.

use std::collections::HashMap;

use super::{op, Node, Pickle, PickleError, PickleFault, PickleLimits, Value};
use super::{MAX_DEPTH_ENV, MAX_OBJECTS_ENV, MAX_STRING_ENV};

/// Largest integer a `LONG1` may encode here (bytes).
const MAX_LONG_BYTES: usize = 16;

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
}
