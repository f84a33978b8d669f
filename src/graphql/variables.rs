//! Whether a request's variables are certainly accepted by validation, so
//! a document that passed validation before need not be validated again
//! ([`super::documents::Documents::run_known`]).
//!
//! Of the engine's validation rules, only one reads variable values: each
//! argument, with its variables put in, must be a valid input value of the
//! argument's type. Here each variable is checked against the type its
//! operation declares for it, which the rules already made at least as
//! strict as every place the variable is used, so a value valid here is
//! valid there. The check errs one way only: anything it is unsure of (a
//! missing variable, a one-of input, a type it does not know) is reported
//! as not certain, and the request is validated in full as before, with the
//! engine's own error if there is one.

use std::sync::OnceLock;

use async_graphql::{
    parser::types::{DocumentOperations, ExecutableDocument, OperationDefinition},
    registry::{MetaType, MetaTypeName, Registry},
    OutputType, Value as ConstValue, Variables,
};

use super::{Mutation, Query, Subscription};

/// The schema's types, as the engine registers them.
fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = Registry::default();
        <Query as OutputType>::create_type_info(&mut registry);
        <Mutation as OutputType>::create_type_info(&mut registry);
        <Subscription as async_graphql::SubscriptionType>::create_type_info(&mut registry);
        registry
    })
}

/// Whether validation certainly accepts `variables` for the operation
/// `operation_name` names in `doc` (the only one, when it names none).
pub fn certainly_valid(doc: &ExecutableDocument, operation_name: Option<&str>, variables: &Variables) -> bool {
    let Some(operation) = selected(doc, operation_name) else { return false };
    operation.variable_definitions.iter().all(|def| {
        let def = &def.node;
        match variables.get(&def.name.node) {
            Some(value) => valid(registry(), &def.var_type.node.to_string(), value),
            // the engine reports a missing variable only when the field
            // runs; left to the full path
            None => def.default_value.is_some() || def.var_type.node.nullable,
        }
    })
}

/// The operation a request runs, chosen as the engine chooses it (`None`
/// where the engine answers "Unknown operation" or "Operation name
/// required").
pub(super) fn selected<'a>(
    doc: &'a ExecutableDocument,
    operation_name: Option<&str>,
) -> Option<&'a OperationDefinition> {
    match (&doc.operations, operation_name) {
        (DocumentOperations::Single(op), None) => Some(&op.node),
        (DocumentOperations::Single(_), Some(_)) => None,
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name).map(|op| &op.node),
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => ops.values().next().map(|op| &op.node),
        _ => None,
    }
}

/// `value` as an input of type `ty` (`Int!`, `[OrderLineInput!]!`): true
/// only when the engine's check certainly passes.
fn valid(registry: &Registry, ty: &str, value: &ConstValue) -> bool {
    match MetaTypeName::create(ty) {
        MetaTypeName::NonNull(inner) => !matches!(value, ConstValue::Null) && valid(registry, inner, value),
        MetaTypeName::List(item) => match value {
            ConstValue::List(items) => items.iter().all(|v| valid(registry, item, v)),
            ConstValue::Null => true,
            // a single value stands for a list of one
            other => valid(registry, item, other),
        },
        MetaTypeName::Named(name) => {
            if matches!(value, ConstValue::Null) {
                return true;
            }
            match registry.types.get(name) {
                Some(MetaType::Scalar { is_valid: Some(is_valid), .. }) => is_valid(value),
                Some(MetaType::Scalar { is_valid: None, .. }) => true,
                Some(MetaType::Enum { enum_values, .. }) => match value {
                    ConstValue::Enum(v) => enum_values.contains_key(v.as_str()),
                    ConstValue::String(v) => enum_values.contains_key(v.as_str()),
                    _ => false,
                },
                Some(MetaType::InputObject { input_fields, oneof: false, .. }) => {
                    let ConstValue::Object(fields) = value else { return false };
                    let known = fields.keys().all(|k| input_fields.contains_key(k.as_str()));
                    known
                        && input_fields.values().all(|field| match fields.get(field.name.as_str()) {
                            Some(v) => valid(registry, &field.ty, v),
                            None => !MetaTypeName::create(&field.ty).is_non_null() || field.default_value.is_some(),
                        })
                }
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_graphql::parser::parse_query;

    const CREATE: &str = "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id } }";

    fn check(query: &str, variables: serde_json::Value) -> bool {
        let doc = parse_query(query).unwrap();
        certainly_valid(&doc, None, &Variables::from_json(variables))
    }

    #[test]
    fn well_typed_variables_are_certain() {
        let line = serde_json::json!({"productId": "prd_1", "quantity": 2});
        assert!(check(CREATE, serde_json::json!({"i": {"lines": [line]}})));
        assert!(check(CREATE, serde_json::json!({"i": {"lines": [line], "idempotencyKey": "k1"}})));
        // one value stands for a list of one, as the engine coerces it
        assert!(check(CREATE, serde_json::json!({"i": {"lines": line}})));
    }

    #[test]
    fn anything_the_engine_could_refuse_is_not_certain() {
        let cases = [
            serde_json::json!({}),
            serde_json::json!({"i": null}),
            serde_json::json!({"i": {"lines": [{"productId": "prd_1", "quantity": "two"}]}}),
            serde_json::json!({"i": {"lines": [{"productId": "prd_1", "quantity": 1.5}]}}),
            serde_json::json!({"i": {"lines": [{"productId": "prd_1"}]}}),
            serde_json::json!({"i": {"lines": [{"productId": "prd_1", "quantity": 1, "colour": "red"}]}}),
            serde_json::json!({"i": {"lines": [null]}}),
            serde_json::json!({"i": "lines"}),
        ];
        for variables in cases {
            assert!(!check(CREATE, variables.clone()), "{variables}");
        }
        let unnamed = "query A { products { nodes { id } } } query B { products { nodes { id } } }";
        assert!(!check(unnamed, serde_json::json!({})), "no operation selected");
        let doc = parse_query(CREATE).unwrap();
        assert!(selected(&doc, Some("Create")).is_none(), "an anonymous operation has no name to select");
        let doc = parse_query(unnamed).unwrap();
        assert!(selected(&doc, Some("B")).is_some() && selected(&doc, Some("C")).is_none());
    }
}
