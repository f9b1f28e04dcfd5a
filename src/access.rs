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

use futures_util::FutureExt;
use regex::Regex;

use crate::connection::Connection;
use crate::mesh::BoxFuture;

/// A name, or a set of names given by a regular expression.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// Exactly this name.
    Exact(String),
    /// Every name the regex matches (anchor it with `^…$` to match whole names).
    Regex(Regex),
}

impl Pattern {
    /// Whether `name` is covered by this pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Regex(regex) => regex.is_match(name),
        }
    }
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
pub(crate) type Guard = Arc<dyn Fn(Connection, String) -> BoxFuture<bool> + Send + Sync>;

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
