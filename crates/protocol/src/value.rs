//! Column values, encoded as MessagePack's own types.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One column value of a synced row: SQLite's storage classes.
///
/// Encoded as the matching MessagePack type (nil, int, float 64, str, bin), so a value costs its
/// payload plus one to five bytes. Equality compares floats by their bits, which makes `Value` `Eq`:
/// two replicas holding the same bits hold the same value, NaN included.
#[derive(Debug, Clone)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes (UUIDs of referenced rows travel as 16-byte blobs).
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Integer(a), Value::Integer(b)) => a == b,
            (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Value {
    /// The payload size in bytes (0 for NULL, 8 for numbers), used to budget pages.
    pub fn payload_len(&self) -> usize {
        match self {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 8,
            Value::Text(text) => text.len(),
            Value::Blob(bytes) => bytes.len(),
        }
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Integer(value)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Value::Real(value)
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Self {
        Value::Blob(value)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Integer(value) => serializer.serialize_i64(*value),
            Value::Real(value) => serializer.serialize_f64(*value),
            Value::Text(value) => serializer.serialize_str(value),
            Value::Blob(value) => serializer.serialize_bytes(value),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nil, an integer, a float, a string or bytes")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Integer(i64::from(value)))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Integer(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        i64::try_from(value).map(Value::Integer).map_err(|_| {
            E::invalid_value(de::Unexpected::Unsigned(value), &"an integer below 2^63")
        })
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Ok(Value::Real(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        Ok(Value::Text(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        Ok(Value::Text(value))
    }

    fn visit_bytes<E: de::Error>(self, value: &[u8]) -> Result<Value, E> {
        Ok(Value::Blob(value.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, value: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Blob(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: Value, encoded_len: usize) {
        let bytes = rmp_serde::to_vec(&value).unwrap();
        assert_eq!(bytes.len(), encoded_len, "{value:?}");
        assert_eq!(rmp_serde::from_slice::<Value>(&bytes).unwrap(), value);
    }

    #[test]
    fn values_use_native_message_pack_types() {
        check(Value::Null, 1);
        check(Value::Integer(5), 1);
        check(Value::Integer(-1_000_000), 5);
        check(Value::Integer(i64::MIN), 9);
        check(Value::Real(1.5), 9);
        check(Value::Real(f64::NAN), 9);
        check(Value::Text("tag".into()), 4);
        check(Value::Blob(vec![7; 16]), 18);
    }

    #[test]
    fn integers_above_i64_are_refused() {
        let bytes = rmp_serde::to_vec(&u64::MAX).unwrap();
        assert!(rmp_serde::from_slice::<Value>(&bytes).is_err());
    }

    #[test]
    fn containers_are_not_values() {
        let bytes = rmp_serde::to_vec(&vec![1, 2]).unwrap();
        assert!(rmp_serde::from_slice::<Value>(&bytes).is_err());
    }
}
