//! Log sequence numbers: positions in PostgreSQL's write-ahead log.
//!
//! An LSN is a 64-bit byte offset into the WAL. PostgreSQL prints it as two hexadecimal
//! halves, `16/B374D848`; the replication protocol carries it as a big-endian `u64`.
//! Every ordering and progress decision in pgcdc is expressed in LSNs.
//!
//! In SQL an LSN is the type `pg_lsn`: [`Lsn`] is a query parameter and a column value of that
//! type directly (its binary form is the same big-endian `u64`), so no statement converts
//! positions through text.

use std::error::Error;
use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use tokio_postgres::types::{accepts, to_sql_checked, FromSql, IsNull, PgLsn, ToSql, Type};

/// A position in the write-ahead log. `Lsn(0)` is the invalid position `0/0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// `pg_lsn` in queries, through the driver's own codec for the type.
impl ToSql for Lsn {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        PgLsn::from(self.0).to_sql(ty, out)
    }

    accepts!(PG_LSN);

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Lsn {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        PgLsn::from_sql(ty, raw).map(|l| Lsn(l.into()))
    }

    accepts!(PG_LSN);
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an LSN: expected two hexadecimal numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for s in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/1"] {
            let lsn: Lsn = s.parse().unwrap();
            assert_eq!(lsn.to_string(), s);
        }
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap().0, 0x16_B374_D848);
    }

    #[test]
    fn pg_lsn_binary_form_is_a_big_endian_u64() {
        let lsn = Lsn(0x16_B374_D848);
        let mut out = BytesMut::new();
        assert!(matches!(
            lsn.to_sql_checked(&Type::PG_LSN, &mut out),
            Ok(IsNull::No)
        ));
        assert_eq!(&out[..], &0x16_B374_D848u64.to_be_bytes());
        assert_eq!(Lsn::from_sql(&Type::PG_LSN, &out).ok(), Some(lsn));
        let max = u64::MAX.to_be_bytes();
        assert_eq!(Lsn::from_sql(&Type::PG_LSN, &max).ok(), Some(Lsn(u64::MAX)));
        // Only pg_lsn: a text or bigint column is a mistake in the query, not an LSN.
        assert!(<Lsn as ToSql>::accepts(&Type::PG_LSN));
        assert!(!<Lsn as ToSql>::accepts(&Type::TEXT));
        assert!(!<Lsn as FromSql>::accepts(&Type::INT8));
        assert!(lsn.to_sql_checked(&Type::TEXT, &mut out).is_err());
        // Short or long values are errors, not panics.
        for bad in [&[][..], &[1, 2, 3], &[0; 9]] {
            assert!(Lsn::from_sql(&Type::PG_LSN, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "/", "1/", "/1", "x/1", "1/2/3", "123456789/0", "-1/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }
}
