//! The admin API's `/v1/audit` answers one capped page (`MAX_PAGE_RECORDS`), counted in
//! `audit_pages_capped` when cut, and pages on with `since`.

use hopmesh_tests::{VerifierHarness, standard_policy};
use hopmesh_transport::audit::MAX_PAGE_RECORDS;
use hopmesh_verifier::authority::Settings;
use serde_json::Value;

#[tokio::test]
async fn the_audit_endpoint_answers_one_capped_page_past_its_edge() {
    let h = VerifierHarness::start(&standard_policy(), Settings::default()).await;
    // One record past the cap (each join token writes one record).
    for _ in 0..=MAX_PAGE_RECORDS {
        h.join_token("a", 60);
    }
    let admin = h.admin();
    let capped = || h.shared().authority().metrics().audit_pages_capped.get();
    let page = admin
        .call("GET", "/v1/audit?since=0", None)
        .await
        .expect("audit page");
    let page = page.as_array().expect("array");
    assert_eq!(page.len(), MAX_PAGE_RECORDS, "cut at the cap");
    assert_eq!(page[0]["seq"], 1);
    assert_eq!(capped(), 1, "the cut is counted");
    let last = page.last().and_then(|r| r["seq"].as_u64()).expect("seq");
    let rest = admin
        .call("GET", &format!("/v1/audit?since={last}"), None)
        .await
        .expect("next page");
    let rest = rest.as_array().expect("array");
    assert!(!rest.is_empty() && rest.len() < MAX_PAGE_RECORDS);
    assert_eq!(
        rest[0]["seq"].as_u64(),
        Some(last + 1),
        "paging loses nothing"
    );
    assert_eq!(capped(), 1, "a page that is not cut is not counted");
    // A smaller limit is honoured; a larger one is clamped to the cap.
    let ten = admin
        .call("GET", "/v1/audit?since=0&limit=10", None)
        .await
        .expect("page");
    assert_eq!(ten.as_array().map(Vec::len), Some(10));
    let big = admin
        .call("GET", "/v1/audit?since=0&limit=1000000", None)
        .await
        .expect("page");
    assert_eq!(big.as_array().map(Vec::len), Some(MAX_PAGE_RECORDS));
    assert!(
        page.iter()
            .chain(rest.iter())
            .filter(|r| r["event"] == "join_token_created")
            .count()
            > MAX_PAGE_RECORDS,
        "every record is reachable: {:?}",
        rest.last().map(|r: &Value| r["seq"].clone())
    );
}
