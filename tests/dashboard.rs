//! The dashboard at `/` (SPEC 7), looked at as a person on the site does: in a real browser, against a
//! running cistern with a slow download in flight and status reports from devices, one of them failed.
//! Also, without a browser, that the page is self-contained (it fetches nothing from elsewhere) and
//! shows what devices report as text, never as markup.

mod browser;
mod common;

use browser::Browser;
use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

const SIZE: usize = 8 << 20;

/// A device id made of markup: the page must show it as it is, not as an element.
const MARKUP_ID: &str = "<i id=injected>dev-x</i>";

fn reports() -> Value {
    let update = json!({"provider": "Contoso", "name": "Sensor", "version": "1.2.0"});
    let r = |id: &str, state: &str, result: i64, ext: &str| {
        json!({"reportId": format!("{id}-1"), "deviceId": id, "updateId": update,
               "workflowId": "wf-1", "state": state, "resultCode": result,
               "extendedResultCode": ext, "resultDetails": ""})
    };
    json!([
        r("dev-1", "DownloadStarted", 0, "0"),
        r("dev-2", "DownloadStarted", 0, "0"),
        r("dev-3", "Failed", 0, "D0190193"),
        r(MARKUP_ID, "Failed", 0, "12345678"),
        r("dev-4", "InstallSucceeded", 700, "0"),
    ])
}

async fn post_reports(node: &Node) {
    let body = Bytes::from(reports().to_string());
    let g = request_body(
        "POST",
        &node.url("/v1/status"),
        &[("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(g.status, 202, "{}", String::from_utf8_lossy(&g.body));
}

/// A node with a slow download in flight (8 MiB at 256 KiB/s, half a minute) and the reports posted.
async fn busy_node(origin: &Origin) -> Node {
    origin.put(
        "/fw.swu",
        random_bytes(SIZE, 7),
        Behaviour {
            rate: Some(256 << 10),
            ..Behaviour::default()
        },
    );
    let node = Node::start(origin, "").await;
    let url = node.url("/o/t/fw.swu");
    tokio::spawn(async move { get(&url).await });
    post_reports(&node).await;
    node
}

/// The value of the first progress bar among the transfers in flight, with its maximum.
const PROGRESS: &str = r#"
    const p = document.querySelector('table[data-list="transfers"] tbody progress');
    return p && p.value > 0 ? [p.value, p.max] : null;"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_progress_failed_devices_and_plots_in_a_browser() {
    let Some(b) =
        Browser::start("a_person_sees_progress_failed_devices_and_plots_in_a_browser").await
    else {
        return;
    };
    let origin = Origin::start().await;
    let node = busy_node(&origin).await;
    b.goto(&node.url("/")).await;
    // A reload would forget this: the page must refresh itself in place.
    b.js("window.notReloaded = true; return null;").await;

    let first = b.until("a transfer with progress", PROGRESS).await;
    assert_eq!(first[1], SIZE as u64, "the bar's end is the size: {first}");
    let moved = format!(
        "const v = (() => {{ {PROGRESS} }})(); return v && v[0] > {} ? v : null;",
        first[0]
    );
    let second = b.until("the progress to move", &moved).await;
    assert!(
        second[0].as_f64() > first[0].as_f64(),
        "{first} then {second}"
    );
    let bar_text = b
        .js(r#"return document.querySelector('table[data-list="transfers"] tbody').innerText;"#)
        .await;
    assert!(
        bar_text.as_str().unwrap_or("").contains("of 8.00 MiB"),
        "bytes so far of the size: {bar_text}"
    );

    let failed = b
        .until(
            "dev-3 among the failed devices",
            r#"const rows = [...document.querySelectorAll('#failed tbody tr')].map(r => r.innerText);
               const row = rows.find(t => t.includes('dev-3'));
               return row ? [row, rows.join('\n')] : null;"#,
        )
        .await;
    let row = failed[0].as_str().unwrap_or("");
    assert!(row.contains("D0190193"), "{row}");
    assert!(row.contains("HTTP 403 from the download source"), "{row}");
    let all = failed[1].as_str().unwrap_or("");
    assert!(
        all.contains(MARKUP_ID),
        "the markup id shown as text: {all}"
    );
    let injected = b
        .js("return document.getElementById('injected') !== null;")
        .await;
    assert_eq!(injected, false, "a reported id became an element");

    let counts = b
        .js(
            r#"const t = document.querySelector('table[data-list="deployments.rows"]');
               return [t.tHead.innerText, t.tBodies[0].innerText];"#,
        )
        .await;
    let (head, body) = (
        counts[0].as_str().unwrap_or(""),
        counts[1].as_str().unwrap_or(""),
    );
    for state in ["DownloadStarted", "Failed", "InstallSucceeded"] {
        assert!(head.contains(state), "a column per state: {head}");
    }
    assert!(body.contains("Contoso/Sensor 1.2.0"), "{body}");
    assert!(
        body.split_whitespace()
            .collect::<Vec<_>>()
            .ends_with(&["5", "2", "2", "1"]),
        "5 devices: 2 downloading, 2 failed, 1 installed: {body}"
    );

    // Each plot is an inline SVG with its data lines (2 px wide) drawn, two of them in each (traffic,
    // uplink by class without a cap, store).
    let lines = b
        .until(
            "the plots drawn with their data",
            r#"const n = [...document.querySelectorAll('figure[data-plot]')].map(f =>
                   [...f.querySelectorAll('svg polyline[stroke-width="2"]')]
                       .filter(l => l.getAttribute('points').trim().split(' ').length >= 2).length);
               return n.length === 3 && n.every(x => x === 2) ? n : null;"#,
        )
        .await;
    assert_eq!(lines, json!([2, 2, 2]));

    let state = b
        .js("return document.getElementById('refresh-state').innerText;")
        .await;
    assert_eq!(state, "live", "the page says it is up to date");
    assert_eq!(b.js("return window.notReloaded === true;").await, true);
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    b.screenshot(&shot).await;
    b.close().await;
    origin.stop();
}

/// The page names no script, style, image or font anywhere else: it works on a site with no internet.
#[tokio::test]
async fn the_page_fetches_nothing_from_elsewhere() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    post_reports(&node).await;
    let page = get(&node.url("/")).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    let html = String::from_utf8_lossy(&page.body);
    for outside in [
        "src=",
        "href=",
        "@import",
        "url(",
        "<link",
        "<meta http-equiv",
    ] {
        assert!(
            !html.contains(outside),
            "the page holds `{outside}`:\n{html}"
        );
    }
    assert!(html.contains("<svg") && html.contains("fetch("), "{html}");
    for path in [
        "/dashboard/plot/traffic.svg",
        "/dashboard/plot/store.svg",
        "/dashboard/plot/uplink.svg",
    ] {
        let svg = get(&node.url(path)).await;
        assert_eq!(svg.header("content-type"), "image/svg+xml", "{path}");
        assert!(svg.body.starts_with(b"<svg"), "{path}");
    }
}

/// What devices report reaches the page as text: the template escapes it, and state.json carries it
/// as it was for the page's script to place as text.
#[tokio::test]
async fn reported_markup_is_shown_as_text() {
    let origin = Origin::start().await;
    let node = Node::start(&origin, "").await;
    post_reports(&node).await;
    let html = String::from_utf8_lossy(&get(&node.url("/")).await.body).to_string();
    assert!(!html.contains(MARKUP_ID), "unescaped in the page");
    assert!(
        html.contains("&#60;i id=injected&#62;dev-x&#60;/i&#62;"),
        "{html}"
    );
    let state = get(&node.url("/dashboard/state.json")).await.json();
    let failed = &state["deployments"]["failed"];
    let ids: Vec<&str> = failed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["deviceId"].as_str())
        .collect();
    assert!(
        ids.contains(&MARKUP_ID) && ids.contains(&"dev-3"),
        "{state}"
    );
}
