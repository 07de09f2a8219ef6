//! Routing: a request names a model, an alias, or a route; the router picks the configured model.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::governor::{Governor, Residency};
use crate::plan::Rejection;

/// How a route picks among its models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteStrategy {
    /// A resident candidate first (in order), then one that loads without evicting, then the first
    /// that is not backing off after a failed load.
    PreferResident,
    /// The first candidate that is not backing off after a failed load.
    Ordered,
}

impl RouteStrategy {
    /// Parses "prefer-resident" or "ordered".
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "prefer-resident" => Some(Self::PreferResident),
            "ordered" | "first" => Some(Self::Ordered),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PreferResident => "prefer-resident",
            Self::Ordered => "ordered",
        }
    }
}

/// A named route over candidate models, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The route's name (what clients ask for).
    pub name: String,
    /// Candidate model names, in preference order.
    pub models: Vec<String>,
    /// How to pick.
    pub strategy: RouteStrategy,
}

/// Why a routing table is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterError {
    /// An alias or route names a model that is not configured.
    UnknownTarget {
        /// The alias or route.
        name: String,
        /// The missing model.
        target: String,
    },
    /// Two things share a name (a model, an alias, a route).
    DuplicateName(String),
    /// A route without candidates.
    EmptyRoute(String),
    /// A route lists the same model twice.
    RepeatedTarget {
        /// The route.
        name: String,
        /// The model listed more than once.
        target: String,
    },
}

impl fmt::Display for RouterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownTarget { name, target } => {
                write!(f, "{name:?} refers to unknown model {target:?}")
            }
            Self::DuplicateName(n) => write!(f, "the name {n:?} is used more than once"),
            Self::EmptyRoute(n) => write!(f, "route {n:?} has no models"),
            Self::RepeatedTarget { name, target } => {
                write!(f, "route {name:?} lists model {target:?} more than once")
            }
        }
    }
}

impl std::error::Error for RouterError {}

/// Resolves names to configured models.
#[derive(Debug, Clone, Default)]
pub struct Router {
    models: BTreeSet<String>,
    aliases: BTreeMap<String, String>,
    routes: BTreeMap<String, Route>,
}

impl Router {
    /// Builds a router, checking that every alias and route names a configured model and that no name is
    /// used twice.
    pub fn try_new(
        models: impl IntoIterator<Item = String>,
        aliases: impl IntoIterator<Item = (String, String)>,
        routes: impl IntoIterator<Item = Route>,
    ) -> Result<Self, RouterError> {
        let mut router = Self::default();
        for m in models {
            if !router.models.insert(m.clone()) {
                return Err(RouterError::DuplicateName(m));
            }
        }
        for (alias, target) in aliases {
            if !router.models.contains(&target) {
                return Err(RouterError::UnknownTarget {
                    name: alias,
                    target,
                });
            }
            if router.models.contains(&alias) || router.aliases.contains_key(&alias) {
                return Err(RouterError::DuplicateName(alias));
            }
            router.aliases.insert(alias, target);
        }
        for route in routes {
            if route.models.is_empty() {
                return Err(RouterError::EmptyRoute(route.name));
            }
            if let Some((_, target)) = route
                .models
                .iter()
                .enumerate()
                .find(|(i, m)| route.models[..*i].contains(m))
            {
                return Err(RouterError::RepeatedTarget {
                    name: route.name,
                    target: target.clone(),
                });
            }
            if let Some(target) = route.models.iter().find(|m| !router.models.contains(*m)) {
                return Err(RouterError::UnknownTarget {
                    name: route.name,
                    target: target.clone(),
                });
            }
            if router.models.contains(&route.name)
                || router.aliases.contains_key(&route.name)
                || router.routes.contains_key(&route.name)
            {
                return Err(RouterError::DuplicateName(route.name));
            }
            router.routes.insert(route.name.clone(), route);
        }
        Ok(router)
    }

    /// Every name a client may use, sorted.
    pub fn known_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .models
            .iter()
            .chain(self.aliases.keys())
            .chain(self.routes.keys())
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The routes, by name.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    /// The aliases of `model`, sorted.
    pub fn aliases_of(&self, model: &str) -> Vec<String> {
        self.aliases
            .iter()
            .filter(|(_, target)| target.as_str() == model)
            .map(|(alias, _)| alias.clone())
            .collect()
    }

    /// Resolves `name` to a configured model, consulting the governor for residency and fit.
    pub fn resolve(&self, name: &str, governor: &Governor, now: u64) -> Result<String, Rejection> {
        if self.models.contains(name) {
            return Ok(name.to_string());
        }
        if let Some(target) = self.aliases.get(name) {
            return Ok(target.clone());
        }
        let Some(route) = self.routes.get(name) else {
            return Err(Rejection::UnknownModel {
                name: name.to_string(),
                known: self.known_names(),
            });
        };
        let usable = |m: &&String| governor.retry_in_ms(m, now).is_none();
        let pick = match route.strategy {
            RouteStrategy::PreferResident => route
                .models
                .iter()
                .find(|m| governor.residency(m) == Some(Residency::Resident))
                .or_else(|| {
                    route
                        .models
                        .iter()
                        .find(|m| governor.residency(m) == Some(Residency::Loading))
                })
                .or_else(|| {
                    route.models.iter().filter(usable).find(|m| {
                        governor
                            .preview_load(m, now)
                            .is_ok_and(|p| p.fits && p.victims.is_empty())
                    })
                })
                .or_else(|| route.models.iter().find(usable)),
            RouteStrategy::Ordered => route.models.iter().find(usable),
        };
        Ok(pick.unwrap_or(&route.models[0]).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, GovernorConfig, ModelSpec, RequestId, RequestKind};

    fn governor(names: &[&str]) -> Governor {
        let specs = names.iter().map(|n| ModelSpec::weights_only(*n, 10));
        Governor::new(GovernorConfig::new(1000, 0), specs)
    }

    fn router(strategy: RouteStrategy) -> Router {
        Router::try_new(
            ["big".to_string(), "small".to_string()],
            [("chat-alias".to_string(), "big".to_string())],
            [Route {
                name: "chat".into(),
                models: vec!["big".into(), "small".into()],
                strategy,
            }],
        )
        .unwrap()
    }

    fn make_resident(g: &mut Governor, name: &str) {
        let plan = g.handle(
            Event::Request {
                id: RequestId(1),
                model: name.into(),
                kind: RequestKind::Load,
            },
            0,
        );
        assert!(plan.loads().any(|m| m == name));
        g.handle(
            Event::LoadFinished {
                model: name.into(),
                measured_bytes: 10,
                kv_tokens: 1,
                load_ms: 1,
            },
            0,
        );
    }

    #[test]
    fn names_aliases_and_routes() {
        let g = governor(&["big", "small"]);
        let r = router(RouteStrategy::PreferResident);
        assert_eq!(r.resolve("small", &g, 0).unwrap(), "small");
        assert_eq!(r.resolve("chat-alias", &g, 0).unwrap(), "big");
        // Nothing resident, everything fits: the first candidate.
        assert_eq!(r.resolve("chat", &g, 0).unwrap(), "big");
        match r.resolve("nope", &g, 0) {
            Err(Rejection::UnknownModel { known, .. }) => {
                assert_eq!(known, vec!["big", "chat", "chat-alias", "small"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn prefer_resident_picks_a_resident_candidate_and_ordered_does_not() {
        let mut g = governor(&["big", "small"]);
        make_resident(&mut g, "small");
        assert_eq!(
            router(RouteStrategy::PreferResident)
                .resolve("chat", &g, 0)
                .unwrap(),
            "small"
        );
        assert_eq!(
            router(RouteStrategy::Ordered)
                .resolve("chat", &g, 0)
                .unwrap(),
            "big"
        );
    }

    #[test]
    fn failed_candidates_are_skipped_while_backing_off() {
        let mut g = governor(&["big", "small"]);
        g.handle(
            Event::Request {
                id: RequestId(1),
                model: "big".into(),
                kind: RequestKind::Load,
            },
            0,
        );
        g.handle(
            Event::LoadFailed {
                model: "big".into(),
                reason: "corrupt".into(),
            },
            0,
        );
        assert_eq!(
            router(RouteStrategy::Ordered)
                .resolve("chat", &g, 10)
                .unwrap(),
            "small"
        );
        // After the backoff it is tried again first.
        assert_eq!(
            router(RouteStrategy::Ordered)
                .resolve("chat", &g, 10_000)
                .unwrap(),
            "big"
        );
    }

    #[test]
    fn invalid_tables_are_refused() {
        let err = |aliases: Vec<(&str, &str)>, routes: Vec<Route>| {
            Router::try_new(
                ["a".to_string()],
                aliases
                    .into_iter()
                    .map(|(x, y)| (x.to_string(), y.to_string())),
                routes,
            )
            .unwrap_err()
        };
        assert_eq!(
            err(vec![("x", "zz")], vec![]),
            RouterError::UnknownTarget {
                name: "x".into(),
                target: "zz".into()
            }
        );
        assert_eq!(
            err(vec![("a", "a")], vec![]),
            RouterError::DuplicateName("a".into())
        );
        let empty = Route {
            name: "r".into(),
            models: vec![],
            strategy: RouteStrategy::Ordered,
        };
        assert_eq!(
            err(vec![], vec![empty]),
            RouterError::EmptyRoute("r".into())
        );
        let twice = Route {
            name: "r".into(),
            models: vec!["a".into(), "b".into(), "a".into()],
            strategy: RouteStrategy::Ordered,
        };
        assert_eq!(
            err(vec![], vec![twice]),
            RouterError::RepeatedTarget {
                name: "r".into(),
                target: "a".into()
            }
        );
        let clash = Route {
            name: "a".into(),
            models: vec!["a".into()],
            strategy: RouteStrategy::Ordered,
        };
        assert_eq!(
            err(vec![], vec![clash]),
            RouterError::DuplicateName("a".into())
        );
    }
}
