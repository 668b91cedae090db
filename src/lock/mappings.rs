//! The mappings of a lock document, and how an existing index's mappings
//! are checked and repaired in place.

use serde_json::{Value, json};

/// The mappings of a lock document: Kibana's fields plus ours, never dynamic.
pub fn lock_mappings() -> Value {
    json!({
        "dynamic": false,
        "properties": {
            "token": {"type": "keyword"},
            "createdAt": {"type": "date"},
            "expiresAt": {"type": "date"},
            "metadata": {"type": "object", "enabled": false},
            "holder": {"type": "keyword"},
            "fencingToken": {"type": "long"}
        }
    })
}

/// True when a mapping (the `mappings` object of an index) can hold locks.
pub fn mappings_are_usable(mappings: &Value) -> bool {
    let props = &mappings["properties"];
    props["token"]["type"] == "keyword" && props["expiresAt"]["type"] == "date"
}

/// The fields to add so `mappings` can hold locks (empty when none), or the
/// first field whose type is wrong, as a message naming it.
pub fn missing_lock_fields(mappings: &Value) -> Result<serde_json::Map<String, Value>, String> {
    let mut missing = serde_json::Map::new();
    let wanted = lock_mappings();
    for (field, spec) in wanted["properties"].as_object().into_iter().flatten() {
        let actual = &mappings["properties"][field];
        if actual.is_null() {
            missing.insert(field.clone(), spec.clone());
            continue;
        }
        let found = actual["type"].as_str().unwrap_or("object");
        let expected = spec["type"].as_str().unwrap_or("object");
        if found != expected {
            return Err(format!(
                "field {field:?} is mapped as {found}, the lock engine needs {expected}; fix or move the index by hand (it is never deleted automatically)"
            ));
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_mappings() {
        assert!(mappings_are_usable(&lock_mappings()));
        let text_token = json!({"properties": {"token": {"type": "text"}, "expiresAt": {"type": "date"}}});
        assert!(!mappings_are_usable(&text_token));
        assert!(!mappings_are_usable(&json!({})));
    }

    #[test]
    fn missing_fields_are_added_and_wrong_types_named() {
        assert!(missing_lock_fields(&lock_mappings()).unwrap().is_empty());
        let kibana = json!({"properties": {"token": {"type": "keyword"}, "expiresAt": {"type": "date"},
            "createdAt": {"type": "date"}, "metadata": {"type": "object", "enabled": false}}});
        let missing = missing_lock_fields(&kibana).unwrap();
        assert_eq!(missing.keys().collect::<Vec<_>>(), ["fencingToken", "holder"]);
        let text_token = json!({"properties": {"token": {"type": "text"}}});
        let err = missing_lock_fields(&text_token).unwrap_err();
        assert!(
            err.contains("\"token\"") && err.contains("text") && err.contains("keyword"),
            "{err}"
        );
        // an object mapped without "type" is an object
        let plain_metadata = json!({"properties": {"metadata": {"properties": {}}}});
        assert!(!missing_lock_fields(&plain_metadata).unwrap().contains_key("metadata"));
    }
}
