//! What a document may cost, judged on the document as written.
//!
//! Depth, complexity, aliases and directives are computed in one walk that
//! costs each fragment once (memoised) and multiplies its spreads, so a
//! document whose fragments would expand to 2^30 fields is priced in
//! microseconds and refused before anything expands it. The engine's own
//! limit visitors walk the *expanded* tree (the fragment-bomb hole), so they
//! are not used: this module is the only place these limits are decided.
//!
//! Complexity is an upper bound on the values a response can hold: every
//! field (`__typename` included) counts one, times the list sizes above it
//! (`first` of a connection, up to 100 `lines` per order). The budget covers a
//! whole HTTP request, all operations of a batch together.

use std::collections::HashMap;

use async_graphql::{
    parser::types::{ExecutableDocument, Field, OperationDefinition, Selection, SelectionSet},
    Name, Value, Variables,
};
use async_graphql_value::Value as Argument;

/// Field depth; the standard introspection query (GraphiQL, codegen) needs 13.
pub const MAX_DEPTH: usize = 16;
/// Values one request may produce (a response of at most a few MB). The
/// admin's page of 100 orders with every line (41,200) fits, so do a page of
/// 20 orders with lines and products and the largest product page; three
/// aliased pages of 100 order histories with products (over 250,000), or ten
/// of them in a batch, do not.
pub const MAX_COMPLEXITY: usize = 50_000;
/// Aliased fields one document may run, its fragments' spreads multiplied.
/// Complexity alone would let many aliases of a cheap root field each run a
/// database query.
pub const MAX_ALIASES: usize = 50;
/// Directives one document may evaluate, spreads multiplied.
pub const MAX_DIRECTIVES: usize = 50;
/// Fragments spread inside fragments inside fragments…: deeper than this is
/// no document a client writes by hand or by codegen.
const MAX_FRAGMENT_NESTING: usize = 32;

/// The page size a connection uses when the client does not say (contract).
const DEFAULT_PAGE: u64 = 20;
/// The largest page (contract).
const MAX_PAGE: u64 = 100;
/// The most lines an order can have (contract).
const MAX_LINES: u64 = 100;

/// What a document (its costliest operation) asks of the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub depth: usize,
    pub complexity: usize,
    pub aliases: usize,
    pub directives: usize,
}

impl Cost {
    fn add(&mut self, other: Cost) {
        self.depth = self.depth.max(other.depth);
        self.complexity = self.complexity.saturating_add(other.complexity);
        self.aliases = self.aliases.saturating_add(other.aliases);
        self.directives = self.directives.saturating_add(other.directives);
    }

    /// The first limit this cost breaks, in words for the client.
    pub fn check(&self) -> Result<(), Refusal> {
        if self.depth > MAX_DEPTH {
            return Err(Refusal::TooDeep(self.depth));
        }
        if self.complexity > MAX_COMPLEXITY {
            return Err(Refusal::TooComplex(self.complexity));
        }
        if self.aliases > MAX_ALIASES {
            return Err(Refusal::TooManyAliases(self.aliases));
        }
        if self.directives > MAX_DIRECTIVES {
            return Err(Refusal::TooManyDirectives(self.directives));
        }
        Ok(())
    }
}

/// Why a document is refused before it runs (`QUERY_TOO_COMPLEX`, except a
/// fragment cycle, which is a malformed document).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the query is nested {0} fields deep; at most {MAX_DEPTH} are accepted")]
    TooDeep(usize),
    #[error("the query could produce {0} values; at most {MAX_COMPLEXITY} per request are accepted (ask for smaller pages or fewer fields)")]
    TooComplex(usize),
    #[error("the query uses {0} aliases (fragment spreads counted each time); at most {MAX_ALIASES} are accepted")]
    TooManyAliases(usize),
    #[error(
        "the query uses {0} directives (fragment spreads counted each time); at most {MAX_DIRECTIVES} are accepted"
    )]
    TooManyDirectives(usize),
    #[error("fragments are spread inside each other more than {MAX_FRAGMENT_NESTING} levels deep")]
    FragmentsTooNested,
    #[error("fragment {0:?} spreads itself")]
    FragmentCycle(String),
}

impl Refusal {
    /// A cycle is a malformed document; everything else is a limit.
    pub fn is_limit(&self) -> bool {
        !matches!(self, Refusal::FragmentCycle(_))
    }
}

/// The cost of the costliest operation of `doc` (only one of them runs),
/// with `first` arguments read from `variables` where they are variables.
pub fn of_document(doc: &ExecutableDocument, variables: &Variables) -> Result<Cost, Refusal> {
    let mut walk = Walk { doc, variables, defaults: defaults(doc), fragments: HashMap::new(), nesting: 0 };
    let mut worst = Cost::default();
    for (_, op) in doc.operations.iter() {
        // each limit is judged alone, so the element-wise maximum is the
        // costliest operation for every one of them
        let c = walk.selection_set(&op.node.selection_set.node)?;
        worst = Cost {
            depth: worst.depth.max(c.depth),
            complexity: worst.complexity.max(c.complexity),
            aliases: worst.aliases.max(c.aliases),
            directives: worst.directives.max(c.directives),
        };
    }
    Ok(worst)
}

/// Variables' default values, from every operation (a fragment does not
/// know which operation spreads it; the first default wins).
fn defaults(doc: &ExecutableDocument) -> HashMap<&Name, Value> {
    let mut out = HashMap::new();
    for (_, op) in doc.operations.iter() {
        let op: &OperationDefinition = &op.node;
        for def in &op.variable_definitions {
            if let Some(default) = &def.node.default_value {
                out.entry(&def.node.name.node).or_insert_with(|| default.node.clone());
            }
        }
    }
    out
}

enum Memo {
    /// Being costed: meeting it again means a cycle.
    Open,
    Done(Cost),
}

struct Walk<'a> {
    doc: &'a ExecutableDocument,
    variables: &'a Variables,
    defaults: HashMap<&'a Name, Value>,
    fragments: HashMap<&'a str, Memo>,
    nesting: usize,
}

impl<'a> Walk<'a> {
    fn selection_set(&mut self, set: &'a SelectionSet) -> Result<Cost, Refusal> {
        let mut cost = Cost::default();
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => cost.add(self.field(&f.node)?),
                Selection::InlineFragment(f) => {
                    let mut inner = self.selection_set(&f.node.selection_set.node)?;
                    inner.directives = inner.directives.saturating_add(f.node.directives.len());
                    cost.add(inner);
                }
                Selection::FragmentSpread(s) => {
                    let mut inner = self.fragment(s.node.fragment_name.node.as_str())?;
                    inner.directives = inner.directives.saturating_add(s.node.directives.len());
                    cost.add(inner);
                }
            }
        }
        Ok(cost)
    }

    fn field(&mut self, field: &'a Field) -> Result<Cost, Refusal> {
        let child = self.selection_set(&field.selection_set.node)?;
        let items = self.list_size(field);
        Ok(Cost {
            depth: child.depth + 1,
            complexity: child.complexity.saturating_add(1).saturating_mul(items),
            aliases: child.aliases.saturating_add(usize::from(field.alias.is_some())),
            directives: child.directives.saturating_add(field.directives.len()),
        })
    }

    /// The cost of a fragment's selection, computed once per document.
    fn fragment(&mut self, name: &'a str) -> Result<Cost, Refusal> {
        match self.fragments.get(name) {
            Some(Memo::Done(cost)) => return Ok(*cost),
            Some(Memo::Open) => return Err(Refusal::FragmentCycle(name.to_string())),
            None => {}
        }
        // An unknown fragment costs nothing here; validation names it.
        let Some(def) = self.doc.fragments.get(name) else { return Ok(Cost::default()) };
        if self.nesting >= MAX_FRAGMENT_NESTING {
            return Err(Refusal::FragmentsTooNested);
        }
        self.fragments.insert(name, Memo::Open);
        self.nesting += 1;
        let cost = self.selection_set(&def.node.selection_set.node);
        self.nesting -= 1;
        let cost = cost?;
        self.fragments.insert(name, Memo::Done(cost));
        Ok(cost)
    }

    /// How many items a field's selection is produced for: the page size of
    /// a connection, the most lines of an order, else one.
    fn list_size(&self, field: &Field) -> usize {
        let size = match field.name.node.as_str() {
            "products" | "orders" => self.page_size(field),
            "lines" => MAX_LINES,
            _ => 1,
        };
        size as usize
    }

    fn page_size(&self, field: &Field) -> u64 {
        let Some(first) = field.get_argument("first") else { return DEFAULT_PAGE };
        let value = match &first.node {
            Argument::Variable(name) => self.variables.get(name).or_else(|| self.defaults.get(name)).cloned(),
            v => v.clone().into_const(),
        };
        match value.unwrap_or(Value::Null) {
            Value::Null => DEFAULT_PAGE,
            // out-of-range pages are refused by the resolver; cost them as the largest
            Value::Number(n) => n.as_u64().map_or(MAX_PAGE, |n| n.clamp(1, MAX_PAGE)),
            _ => MAX_PAGE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(query: &str) -> Result<Cost, Refusal> {
        let doc = async_graphql::parser::parse_query(query).expect("parses");
        of_document(&doc, &Variables::default())
    }

    fn bomb(levels: usize, leaf: &str) -> String {
        let mut q = String::from("query { ...F0 }\n");
        for i in 0..levels {
            q.push_str(&format!("fragment F{i} on Query {{ ...F{n} ...F{n} }}\n", n = i + 1));
        }
        q.push_str(&format!("fragment F{levels} on Query {{ {leaf} }}\n"));
        q
    }

    #[test]
    fn a_fragment_bomb_is_priced_without_expanding_it() {
        let started = std::time::Instant::now();
        let c = cost(&bomb(30, "me { id }")).unwrap();
        assert_eq!(c.complexity, 2 << 30, "2^30 copies of me and its id");
        assert_eq!(c.check(), Err(Refusal::TooComplex(2 << 30)));
        assert_eq!(cost(&bomb(31, "__typename")).unwrap().complexity, 1 << 31);
        assert_eq!(cost(&bomb(40, "__typename")), Err(Refusal::FragmentsTooNested));
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
    }

    #[test]
    fn spreads_multiply_aliases_and_directives() {
        let c = cost("{ ...A ...A ...A } fragment A on Query { a: __typename @include(if: true) }").unwrap();
        assert_eq!((c.complexity, c.aliases, c.directives, c.depth), (3, 3, 3, 1));
    }

    #[test]
    fn list_sizes_multiply() {
        let c = cost("{ orders(first: 10) { nodes { lines { quantity } } } }").unwrap();
        // orders: 10 × (1 + nodes(1 + lines: 100 × (1 + 1)))
        assert_eq!(c.complexity, 10 * (1 + 1 + 100 * 2));
        let c = cost("{ products { nodes { id } } }").unwrap();
        assert_eq!(c.complexity, 20 * 3);
    }

    #[test]
    fn page_sizes_come_from_variables_and_their_defaults() {
        let doc =
            async_graphql::parser::parse_query("query($n: Int = 5) { products(first: $n) { nodes { id } } }").unwrap();
        assert_eq!(of_document(&doc, &Variables::default()).unwrap().complexity, 5 * 3);
        let vars = Variables::from_json(serde_json::json!({"n": 100}));
        assert_eq!(of_document(&doc, &vars).unwrap().complexity, 100 * 3);
    }

    #[test]
    fn a_fragment_cycle_is_refused_not_followed() {
        let e = cost("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }").unwrap_err();
        assert!(matches!(e, Refusal::FragmentCycle(_)));
        assert!(!e.is_limit());
    }

    #[test]
    fn the_introspection_query_fits() {
        let q = include_str!("../../tests/fixtures/introspection.graphql");
        let c = cost(q).unwrap();
        c.check().unwrap_or_else(|e| panic!("{e}: {c:?}"));
    }
}
