//! Who may use which names: patterns (an exact name or a regex) mapped to rules, and the
//! async guards that decide per connection.
//!
//! Rooms with presence, guarded rooms, and later channels, records and collections are all
//! exposed the same way: `builder.track_presence("lobby", ..)` or
//! `builder.track_presence(Regex::new("^game:")?, ..)`. Exposing the same exact name or the
//! same regex source again replaces the earlier rule (as mesh does). An exact name wins
//! over a regex; among regexes, the first registered that matches wins.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use regex::Regex;

use crate::config::MAX_NAME_BYTES;
use crate::connection::Connection;
use crate::error::CommandError;

/// Refuses an empty or oversized name (of a room, channel, record or collection) before
/// anything is stored under it; `field` is the payload field, for the message.
pub(crate) fn valid_name<'a>(field: &str, name: &'a str) -> Result<&'a str, CommandError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(CommandError::invalid(format!(
            "{field} must be a non-empty string of at most {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(name)
}

/// A name, or a set of names given by a regular expression.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// Exactly this name.
    Exact(String),
    /// Every name the regex matches (anchor it with `^…$` to match whole names).
    Regex(Regex),
}

impl Pattern {
    /// A text that names this pattern on every instance (exact names and regexes apart).
    pub(crate) fn key(&self) -> String {
        match self {
            Pattern::Exact(name) => format!("={name}"),
            Pattern::Regex(regex) => format!("~{}", regex.as_str()),
        }
    }

    /// Whether `name` is covered by this pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Regex(regex) => regex.is_match(name),
        }
    }

    /// A text every name this pattern matches starts with (`""` when there is none to
    /// tell), so that a listing can read just that range of an ordered index.
    pub(crate) fn literal_prefix(&self) -> String {
        match self {
            Pattern::Exact(name) => name.clone(),
            Pattern::Regex(regex) => regex_literal_prefix(regex.as_str()),
        }
    }
}

/// The literal text an anchored regex (`^task:` or `^a\.b`) requires its matches to start
/// with; `""` when it is not anchored, or may branch (`|`) before any fixed text.
fn regex_literal_prefix(source: &str) -> String {
    let Some(rest) = source.strip_prefix('^') else {
        return String::new();
    };
    if source.contains('|') {
        return String::new();
    }
    let mut prefix = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&escaped) if escaped.is_ascii_punctuation() => {
                    prefix.push(escaped);
                    chars.next();
                }
                _ => break,
            },
            '?' | '*' | '{' => {
                // The last character may be absent (or repeated zero times).
                prefix.pop();
                break;
            }
            '.' | '[' | ']' | '(' | ')' | '}' | '+' | '^' | '$' => break,
            literal => prefix.push(literal),
        }
    }
    prefix
}

impl From<&str> for Pattern {
    fn from(name: &str) -> Self {
        Pattern::Exact(name.to_owned())
    }
}

impl From<String> for Pattern {
    fn from(name: String) -> Self {
        Pattern::Exact(name)
    }
}

impl From<&String> for Pattern {
    fn from(name: &String) -> Self {
        Pattern::Exact(name.clone())
    }
}

impl From<Regex> for Pattern {
    fn from(regex: Regex) -> Self {
        Pattern::Regex(regex)
    }
}

/// An async predicate over a connection and the name it asks for.
pub(crate) type Guard = Arc<dyn Fn(Connection, String) -> BoxFuture<'static, bool> + Send + Sync>;

/// Who may use an exposed name (a channel, a record, a collection): anyone, or whom an
/// async guard allows. The guard gets the connection (with the upgrade request's headers
/// and extensions) and the exact name asked for.
///
/// ```
/// use tower_mesh::{Access, Mesh};
///
/// let (layer, mesh) = Mesh::builder()
///     .expose_channel("news", Access::open())
///     .expose_channel("staff", Access::guarded(|connection, _channel| async move {
///         connection.headers().contains_key("x-staff")
///     }))
///     .build();
/// ```
#[derive(Clone, Default)]
pub struct Access {
    pub(crate) guard: Option<Guard>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

impl Access {
    /// Anyone may use it.
    pub fn open() -> Self {
        Access::default()
    }

    /// Whoever `guard` allows.
    pub fn guarded<F, Fut>(guard: F) -> Self
    where
        F: Fn(Connection, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        Access {
            guard: Some(self::guard(guard)),
        }
    }

    /// Whether `connection` may use `name`.
    pub(crate) async fn allows(&self, connection: &Connection, name: &str) -> bool {
        allows(self.guard.as_ref(), connection, name).await
    }
}

/// Wraps a user closure as a [`Guard`].
pub(crate) fn guard<F, Fut>(guard: F) -> Guard
where
    F: Fn(Connection, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Arc::new(move |connection, name| Box::pin(guard(connection, name)))
}

/// Runs an optional guard. No guard allows; a guard that panics refuses (and is logged),
/// so a bug in a guard never opens what it protects.
pub(crate) async fn allows(guard: Option<&Guard>, connection: &Connection, name: &str) -> bool {
    let Some(guard) = guard else {
        return true;
    };
    match std::panic::AssertUnwindSafe(guard(connection.clone(), name.to_owned()))
        .catch_unwind()
        .await
    {
        Ok(allowed) => allowed,
        Err(_) => {
            tracing::error!(name, "a guard panicked; refusing");
            false
        }
    }
}

/// Rules by pattern: exact names in a map, regexes in registration order.
pub(crate) struct Rules<T> {
    exact: HashMap<String, T>,
    regexes: Vec<(Regex, T)>,
}

impl<T> Default for Rules<T> {
    fn default() -> Self {
        Rules {
            exact: HashMap::new(),
            regexes: Vec::new(),
        }
    }
}

impl<T> Rules<T> {
    /// Adds a rule; the same exact name or regex source replaces the earlier rule.
    pub(crate) fn insert(&mut self, pattern: Pattern, rule: T) {
        match pattern {
            Pattern::Exact(name) => {
                self.exact.insert(name, rule);
            }
            Pattern::Regex(regex) => {
                match self
                    .regexes
                    .iter_mut()
                    .find(|(existing, _)| existing.as_str() == regex.as_str())
                {
                    Some(existing) => existing.1 = rule,
                    None => self.regexes.push((regex, rule)),
                }
            }
        }
    }

    /// The rule for `name`: its exact rule, else the first regex that matches.
    pub(crate) fn find(&self, name: &str) -> Option<&T> {
        self.exact.get(name).or_else(|| {
            self.regexes
                .iter()
                .find(|(regex, _)| regex.is_match(name))
                .map(|(_, rule)| rule)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_prefixes_of_patterns() {
        let prefix = |source: &str| Pattern::from(Regex::new(source).unwrap()).literal_prefix();
        assert_eq!(prefix("^task:"), "task:");
        assert_eq!(prefix("^task:[0-9]+$"), "task:");
        assert_eq!(prefix(r"^a\.b\d"), "a.b");
        assert_eq!(prefix("^tasks?:"), "task");
        assert_eq!(prefix("^ab+"), "ab");
        assert_eq!(prefix("task:"), "");
        assert_eq!(prefix("^a|^b"), "");
        assert_eq!(prefix("(?i)^task"), "");
        assert_eq!(prefix(""), "");
        assert_eq!(Pattern::from("exact").literal_prefix(), "exact");
    }

    #[test]
    fn exact_beats_regex_and_later_replaces_earlier() {
        let mut rules = Rules::default();
        rules.insert(Pattern::from(Regex::new("^room:").unwrap()), 1);
        rules.insert(Pattern::from("room:vip"), 2);
        rules.insert(Pattern::from("room:vip"), 3);
        rules.insert(Pattern::from(Regex::new("^room:").unwrap()), 4);
        assert_eq!(rules.find("room:vip"), Some(&3));
        assert_eq!(rules.find("room:a"), Some(&4));
        assert_eq!(rules.find("other"), None);
        assert_eq!(rules.regexes.len(), 1);
    }
}
