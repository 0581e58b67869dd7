//! The writer: protocol 4, the opcodes PyTorch's memory visualiser understands.

use std::collections::HashMap;

use super::op;

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
