//! Policies (DESIGN 4): a replication policy sets the RPO threshold (an alert, never a limit),
//! how long recovery points are kept, and how often app-consistent points are made. Creating
//! one also creates its failback policy, as Azure Site Recovery does: RPO threshold 15 min,
//! retention 24 h, app-consistent every 60 min, bound to the configuration server and not
//! editable.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A whole number as JSON Schema's `integer` allows it: `30`, `30.0`, or (in a query
/// string) `"30"`.
pub(crate) fn whole<'de, D: serde::Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> Result<T, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(u64),
        Float(f64),
        Text(String),
    }
    let bad = || serde::de::Error::custom("expected a whole number in range");
    let n = match Number::deserialize(d)? {
        Number::Int(n) => n,
        Number::Float(f) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => f as u64,
        Number::Float(_) => return Err(bad()),
        Number::Text(s) => {
            let f: f64 = s.trim().parse().map_err(|_| bad())?;
            if f.fract() != 0.0 || !(0.0..=u64::MAX as f64).contains(&f) {
                return Err(bad());
            }
            f as u64
        }
    };
    T::try_from(n).map_err(|_| bad())
}

/// [`whole`], optional.
pub(crate) fn whole_opt<'de, D: serde::Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap<T: TryFrom<u64>>(#[serde(deserialize_with = "whole")] T);
    Ok(Option::<Wrap<T>>::deserialize(d)?.map(|Wrap(v)| v))
}

/// The failback policy's settings: fixed.
pub const FAILBACK_RPO_SECONDS: u64 = 15 * 60;
pub const FAILBACK_RETENTION_SECONDS: u64 = 24 * 3600;
pub const FAILBACK_APP_CONSISTENT_SECONDS: u64 = 60 * 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Replication,
    Failback,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Replication => "replication",
            PolicyKind::Failback => "failback",
        }
    }
}

/// A replication policy's settings, as an operator gives them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Past this RPO an alert is raised (replication goes on).
    #[schema(minimum = 1, maximum = 604800)]
    #[serde(deserialize_with = "whole")]
    pub rpo_threshold_seconds: u64,
    /// How long recovery points are kept.
    #[schema(minimum = 60, maximum = 31536000)]
    #[serde(deserialize_with = "whole")]
    pub retention_seconds: u64,
    /// How often an app-consistent point is made; 0 for none.
    #[schema(minimum = 0, maximum = 604800)]
    #[serde(deserialize_with = "whole")]
    pub app_consistent_seconds: u64,
}

/// A new replication policy.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    /// 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'.
    #[schema(
        pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    #[schema(minimum = 1, maximum = 604800)]
    #[serde(deserialize_with = "whole")]
    pub rpo_threshold_seconds: u64,
    #[schema(minimum = 60, maximum = 31536000)]
    #[serde(deserialize_with = "whole")]
    pub retention_seconds: u64,
    #[schema(minimum = 0, maximum = 604800)]
    #[serde(deserialize_with = "whole")]
    pub app_consistent_seconds: u64,
}

impl NewPolicy {
    pub fn settings(&self) -> PolicySettings {
        PolicySettings {
            rpo_threshold_seconds: self.rpo_threshold_seconds,
            retention_seconds: self.retention_seconds,
            app_consistent_seconds: self.app_consistent_seconds,
        }
    }
}

/// A policy as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    pub id: i64,
    pub name: String,
    pub kind: PolicyKind,
    pub rpo_threshold_seconds: u64,
    pub retention_seconds: u64,
    pub app_consistent_seconds: u64,
    /// A failback policy: the replication policy it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failback_of: Option<String>,
    /// A failback policy is bound to the configuration server (`configuration-server`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<String>,
    pub editable: bool,
}

impl PolicySettings {
    /// The failback policy's fixed settings.
    pub fn failback() -> Self {
        PolicySettings {
            rpo_threshold_seconds: FAILBACK_RPO_SECONDS,
            retention_seconds: FAILBACK_RETENTION_SECONDS,
            app_consistent_seconds: FAILBACK_APP_CONSISTENT_SECONDS,
        }
    }

    /// Bounds that keep a policy meaningful; the message names the field and the range.
    pub fn check(&self) -> Result<(), String> {
        let within = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{field} is {v}: use {lo} to {hi}"))
            }
        };
        within(
            "rpo_threshold_seconds",
            self.rpo_threshold_seconds,
            1,
            7 * 86400,
        )?;
        within("retention_seconds", self.retention_seconds, 60, 365 * 86400)?;
        within(
            "app_consistent_seconds",
            self.app_consistent_seconds,
            0,
            7 * 86400,
        )
    }
}

/// The name of the failback policy of replication policy `name`.
pub fn failback_name(name: &str) -> String {
    format!("{name}-failback")
}
