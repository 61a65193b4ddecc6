//! The PostgreSQL backend, for large fleets and several hub replicas writing one database.

use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls};

use super::{Arg, Backend, Sql, StoreError};

pub struct Postgres {
    client: Client,
}

impl Postgres {
    /// Connects with a libpq-style string (`host=... port=... user=... dbname=...`) or URL.
    pub fn connect(url: &str) -> Result<Postgres, StoreError> {
        Ok(Postgres {
            client: Client::connect(url, NoTls)?,
        })
    }
}

impl ToSql for Arg {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Arg::Int(i) => i.to_sql(ty, out),
            Arg::Text(t) => t.as_str().to_sql(ty, out),
            Arg::Null => Ok(postgres::types::IsNull::Yes),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <&str as ToSql>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

struct Tx<'c>(postgres::Transaction<'c>);

fn refs(args: &[Arg]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

impl Sql for Tx<'_> {
    fn exec(&mut self, sql: &str, args: &[Arg]) -> Result<u64, StoreError> {
        Ok(self.0.execute(sql, &refs(args))?)
    }

    fn rows(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Vec<Arg>>, StoreError> {
        let rows = self.0.query(sql, &refs(args))?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| {
                        let ty = row.columns()[i].type_().clone();
                        Ok(if ty == Type::INT8 {
                            row.try_get::<_, Option<i64>>(i)?.map(Arg::Int)
                        } else if ty == Type::INT4 {
                            row.try_get::<_, Option<i32>>(i)?
                                .map(|v| Arg::Int(i64::from(v)))
                        } else {
                            row.try_get::<_, Option<String>>(i)?.map(Arg::Text)
                        }
                        .unwrap_or(Arg::Null))
                    })
                    .collect()
            })
            .collect()
    }

    fn for_update(&self) -> &'static str {
        " FOR UPDATE"
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(self.0.commit()?)
    }
}

impl Backend for Postgres {
    fn begin(&mut self) -> Result<Box<dyn Sql + '_>, StoreError> {
        Ok(Box::new(Tx(self.client.transaction()?)))
    }
}
