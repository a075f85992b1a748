//! The dashboard at `/` (SPEC 7), looked at as a person on the site does: in a real browser, against a
//! running cistern with a slow download in flight and status reports from devices, one of them failed.
//! Also, without a browser, that the page is self-contained (it fetches nothing from elsewhere) and
//! shows what devices report as text, never as markup; the uplink's use by class (plot and figures),
//! prefetch jobs waiting for a window or their time, and the stored images.

mod browser;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use browser::Browser;
use bytes::Bytes;
use common::registry::site;
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

/// The data lines (2 px wide) of a plot in the order they are drawn, which is the legend's order: each
/// as its points' y coordinates (in SVG, a larger value is drawn higher, at a smaller y).
fn data_lines(svg: &str) -> Vec<Vec<f64>> {
    svg.lines()
        .filter(|l| l.contains("<polyline") && l.contains(r#"stroke-width="2""#))
        .map(|l| {
            let points = l.split("points=\"").nth(1).unwrap_or("");
            let points = points.split('"').next().unwrap_or("");
            points
                .split_whitespace()
                .filter_map(|p| p.split_once(',')?.1.parse().ok())
                .collect()
        })
        .collect()
}

/// The uplink plot's lines (foreground, background) once `ready` holds for them, within `secs`.
async fn uplink_lines(
    node: &Node,
    secs: u64,
    ready: impl Fn(&[Vec<f64>]) -> bool,
) -> Vec<Vec<f64>> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let svg = get(&node.url("/dashboard/plot/uplink.svg")).await;
        assert_eq!(svg.header("content-type"), "image/svg+xml");
        let svg = String::from_utf8_lossy(&svg.body).to_string();
        let lines = data_lines(&svg);
        if lines.len() == 2 && ready(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < end,
            "the uplink plot never came to be as waited for:\n{svg}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn prefetch(node: &Node, job: Value) -> String {
    let r = admin_request(
        "POST",
        &node.url("/v1/admin/prefetch"),
        job.to_string().into(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap_or_default().to_string()
}

/// Waits until the job's state is `state`; the job as it is then.
async fn job_in(node: &Node, id: &str, state: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let j = get(&node.url(&format!("/v1/admin/prefetch/{id}")))
            .await
            .json();
        if j["state"] == state {
            return j;
        }
        assert!(Instant::now() < end, "the job never was {state}: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A miss a client waits for is foreground; a prefetch job is background. The plot's rates are those
/// of the intervals between the samples (every 10 s): the miss falls in the first interval, the job in
/// the second, and each class's line rises in its own interval only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_plot_shows_a_miss_as_foreground_and_a_prefetch_as_background() {
    let origin = Origin::start().await;
    // 8 MiB over the miss's interval (10 s), 2 MiB at 1 MiB/s in the job's (from the sample that
    // ended the miss's to now, about 2 s): rates of the same order, both well above the axis.
    let (fg, bg) = (random_bytes(8 << 20, 31), random_bytes(2 << 20, 32));
    origin.put("/fg", fg.clone(), Behaviour::default());
    let slow = Behaviour {
        rate: Some(1 << 20),
        ..Behaviour::default()
    };
    origin.put("/bg", bg.clone(), slow);
    let node = Node::start(&origin, "").await;
    // The sample taken at start, and one taken now: a line of one interval.
    uplink_lines(&node, 10, |l| l.iter().all(|p| p.len() == 2)).await;
    assert_eq!(get(&node.url("/o/t/fg")).await.body, fg);
    // The next sample closes the miss's interval: two intervals (or more, on a slow machine), each a
    // step of two points.
    uplink_lines(&node, 20, |l| l.iter().all(|p| p.len() >= 4)).await;
    let file = json!({"url": format!("{}/bg", origin.url()), "sha256": sha256_hex(&bg)});
    let id = prefetch(&node, json!({"files": [file]})).await;
    job_in(&node, &id, "done").await;
    let lines = uplink_lines(&node, 5, |l| l.iter().all(|p| p.len() >= 4)).await;
    // The first interval's height (its y), and the highest any later interval reaches.
    let first_and_later = |l: &[f64]| (l[0], l[2..].iter().copied().fold(f64::MAX, f64::min));
    let (fg_miss, fg_later) = first_and_later(&lines[0]);
    let (bg_miss, bg_later) = first_and_later(&lines[1]);
    assert!(
        fg_miss < fg_later,
        "foreground up in the miss's interval only: {lines:?}"
    );
    assert!(
        bg_later < bg_miss,
        "background up after the miss's interval, with the job: {lines:?}"
    );
    assert!(
        fg_miss < bg_miss,
        "no background bytes with the miss: {lines:?}"
    );
}

/// Monday 2026-12-07 09:59 UTC, a minute before the window `Mon 10:00-11:00` opens.
const BEFORE_WINDOW: &str = "2026-12-07T09:59:00Z";
const WINDOW_OPENS: &str = "2026-12-07T10:00:00Z";

/// A node with the uplink capped and background work held to a window that is closed now (its clock
/// stands at [`BEFORE_WINDOW`]).
async fn windowed_node(origin: &Origin) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        origin,
        "[uplink]\nmax_rate = \"8MiB\"\nbackground_rate = \"2MiB\"\nwindows = [\"Mon 10:00-11:00\"]\n",
    );
    let now: jiff::Timestamp = BEFORE_WINDOW.parse().unwrap();
    cfg.uplink.clock = cistern::config::WallClock(Some(Arc::new(move || now)));
    let mut node = Node::start_with(cfg).await;
    node.keep(tmp);
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_json_has_the_uplink_caps_rates_and_next_window() {
    let origin = Origin::start().await;
    let slow = Behaviour {
        rate: Some(256 << 10),
        ..Behaviour::default()
    };
    origin.put("/slow", random_bytes(4 << 20, 33), slow);
    let node = windowed_node(&origin).await;
    let url = node.url("/o/t/slow");
    tokio::spawn(async move { get(&url).await });
    let end = Instant::now() + Duration::from_secs(10);
    let up = loop {
        let up = get(&node.url("/dashboard/state.json")).await.json()["uplink"].clone();
        if up["foreground"] != "0 B/s" && up["foreground"].is_string() {
            break up;
        }
        assert!(Instant::now() < end, "no foreground rate: {up}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(up["maxRate"], "8.00 MiB/s", "{up}");
    assert_eq!(up["backgroundRate"], "2.00 MiB/s", "{up}");
    assert_eq!(up["background"], "0 B/s", "{up}");
    assert_eq!(up["windows"], "Mon 10:00-11:00 (UTC)", "{up}");
    assert_eq!(up["windowOpen"], false, "{up}");
    assert_eq!(up["nextWindow"], WINDOW_OPENS, "{up}");
    assert_eq!(up["window"], format!("closed until {WINDOW_OPENS}"), "{up}");
    let html = String::from_utf8_lossy(&get(&node.url("/")).await.body).to_string();
    assert!(
        html.contains(&format!("closed until {WINDOW_OPENS}")) && html.contains("8.00 MiB/s"),
        "{html}"
    );
}

/// The rows of the table in the page's section `id`, each as its cells (their markup as it is); none
/// when the table says it is empty.
fn rows(html: &str, id: &str) -> Vec<Vec<String>> {
    let section = html
        .split(&format!("<section id=\"{id}\">"))
        .nth(1)
        .and_then(|s| s.split("</section>").next())
        .unwrap_or_else(|| panic!("no section {id}:\n{html}"));
    let body = section.split("<tbody>").nth(1).unwrap_or("");
    body.split("<tr>")
        .skip(1)
        .filter(|r| !r.contains(r#"class="empty""#))
        .map(|r| {
            r.split("<td")
                .skip(1)
                .filter_map(|c| {
                    Some(
                        c.split_once('>')?
                            .1
                            .split("</td>")
                            .next()?
                            .trim()
                            .to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// A job held to the windows waits for the next one; a job given a `notBefore` waits for that time:
/// the page says so, with the time each waits for, and neither is shown as ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_window_or_their_time_show_so_on_the_page() {
    let origin = Origin::start().await;
    let b = random_bytes(64 << 10, 34);
    origin.put("/w", b.clone(), Behaviour::default());
    let node = windowed_node(&origin).await;
    let file = json!([{"url": format!("{}/w", origin.url()), "sha256": sha256_hex(&b)}]);
    let windowed = prefetch(&node, json!({"files": file})).await;
    let later = "2026-12-08T00:00:00Z";
    let timed = prefetch(
        &node,
        json!({"files": file, "window": false, "notBefore": later}),
    )
    .await;
    job_in(&node, &windowed, "waiting-window").await;
    job_in(&node, &timed, "queued").await;
    let html = String::from_utf8_lossy(&get(&node.url("/")).await.body).to_string();
    let jobs = rows(&html, "prefetch");
    let row = |id: &str| {
        jobs.iter()
            .find(|r| r.first().map(String::as_str) == Some(id))
            .cloned()
            .unwrap_or_else(|| panic!("no row for job {id}: {jobs:?}"))
    };
    let w = row(&windowed);
    assert_eq!(w[1], "waiting-window", "{w:?}");
    assert_eq!(w[2], format!("the next window, {WINDOW_OPENS}"), "{w:?}");
    assert_eq!(w[3], "0 of 1 stored", "{w:?}");
    let t = row(&timed);
    assert_eq!(t[1], "queued", "{t:?}");
    assert_eq!(t[2], format!("notBefore, {later}"), "{t:?}");
    assert_eq!(origin.gets("/w"), 0, "nothing fetched while waiting");
    let state = get(&node.url("/dashboard/state.json")).await.json();
    let states: Vec<&str> = state["prefetch"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["state"].as_str())
        .collect();
    assert_eq!(
        states,
        ["queued", "waiting-window"],
        "newest first: {state}"
    );
}

/// An image staged by a prefetch job (its manifest, config and layers among the job's files) is listed
/// in the page's table of images as `GET /v1/admin/images` lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_image_appears_in_the_images_table() {
    let Some(s) = site("").await else { return };
    let node = &s.node;
    let id = prefetch(node, json!({"images": ["local/test/app:1"]})).await;
    let job = job_in(node, &id, "done").await;
    let urls: Vec<&str> = job["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["url"].as_str())
        .collect();
    for d in s.image.layers.iter().chain([&s.image.config]) {
        assert!(
            urls.iter().any(|u| u.ends_with(d.as_str())),
            "{d} in {urls:?}"
        );
    }
    let html = String::from_utf8_lossy(&get(&node.url("/")).await.body).to_string();
    let images = rows(&html, "images");
    let digest = format!("sha256:{}", s.image.manifest);
    let registry = s.front.addr.to_string();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(
        images[0][..5],
        [
            registry.as_str(),
            "test/app",
            "1",
            digest.as_str(),
            "linux/amd64"
        ],
        "{images:?}"
    );
    assert!(
        !images[0][5].is_empty() && images[0][5] != "0 B",
        "{images:?}"
    );
    let listed = get(&node.url("/v1/admin/images")).await.json();
    let state = get(&node.url("/dashboard/state.json")).await.json();
    assert_eq!(state["images"][0]["digest"], listed[0]["digest"], "{state}");
    assert_eq!(state["imagesShown"], "1");
}
