//! The dashboard (SPEC 7): the page at `/`, rendered from `src/ops/dashboard/templates/dashboard/` (askama, which escapes
//! every value), the `/dashboard/state.json` it refreshes itself from, and its plots as SVG under
//! `/dashboard/plot/` (store, traffic, uplink use by class). Everything it needs is in the binary: the
//! page works on a site with no internet.
//! Reads only what `store`, `fetch`, `server` and `relay` expose, through [`Ops`].

pub mod plot;
pub mod samples;
pub mod view;

use std::sync::atomic::Ordering;

use askama::Template;
use http::{Response, StatusCode};

use super::{text, Ops};
use crate::fetch::uplink::Class;
use crate::server::Body;
use samples::Sample;
use view::View;

/// The page: the view as it is now, and the plots drawn from the samples.
#[derive(Template)]
#[template(path = "dashboard/page.html", config = "src/ops/dashboard/askama.toml")]
struct Page<'a> {
    v: &'a View,
    store_svg: &'a str,
    traffic_svg: &'a str,
    uplink_svg: &'a str,
}

/// Answers the dashboard's paths; None for any other.
pub async fn handle(ops: &Ops, path: &str) -> Option<Response<Body>> {
    Some(match path {
        "/" => page(ops).await,
        "/dashboard/state.json" => match serde_json::to_string(&view(ops).await) {
            Ok(json) => text(StatusCode::OK, "application/json", json),
            Err(e) => failed(&e),
        },
        "/dashboard/plot/store.svg" => svg(plot::store(&ops.samples_until_now(), now_ms())),
        "/dashboard/plot/traffic.svg" => svg(plot::traffic(&ops.samples_until_now(), now_ms())),
        "/dashboard/plot/uplink.svg" => svg(plot::uplink(&ops.samples_until_now(), now_ms())),
        _ => return None,
    })
}

/// The view as it is now, with the stored images as `GET /v1/admin/images` lists them (read from
/// the stored manifests, hence a future).
async fn view(ops: &Ops) -> View {
    let images = crate::server::stored_images(&ops.store).await;
    View::of(ops, images)
}

async fn page(ops: &Ops) -> Response<Body> {
    let v = view(ops).await;
    let (store_svg, traffic_svg, uplink_svg) = match plots(&ops.samples_until_now(), now_ms()) {
        Ok(p) => p,
        Err(e) => return failed(&e),
    };
    let page = Page {
        v: &v,
        store_svg: &store_svg,
        traffic_svg: &traffic_svg,
        uplink_svg: &uplink_svg,
    };
    match page.render() {
        Ok(html) => text(StatusCode::OK, "text/html; charset=utf-8", html),
        Err(e) => failed(&e),
    }
}

/// The page's three plots: store, traffic, uplink.
fn plots(samples: &[Sample], now: u64) -> Result<(String, String, String), plot::PlotError> {
    Ok((
        plot::store(samples, now)?,
        plot::traffic(samples, now)?,
        plot::uplink(samples, now)?,
    ))
}

fn svg(r: Result<String, plot::PlotError>) -> Response<Body> {
    match r {
        Ok(s) => text(StatusCode::OK, "image/svg+xml", s),
        Err(e) => failed(&e),
    }
}

/// A page or plot that could not be made: 500 with the JSON error body cistern's errors have.
fn failed(e: &dyn std::fmt::Display) -> Response<Body> {
    tracing::error!(error = %e, "dashboard");
    let body = serde_json::json!({"error": "dashboard", "detail": e.to_string()});
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "application/json",
        body.to_string(),
    )
}

fn now_ms() -> u64 {
    crate::store::now_ms()
}

impl Ops {
    /// The counters the plots follow, as they are now.
    pub fn sample(&self) -> Sample {
        let u = self.store.usage();
        let up = self.fetcher.uplink();
        Sample {
            at_ms: now_ms(),
            served: self.server.hit_bytes.load(Ordering::Relaxed)
                + self.server.miss_bytes.load(Ordering::Relaxed),
            fetched: self.fetcher.stats().bytes_fetched.load(Ordering::Relaxed),
            store_used: u.bytes,
            store_budget: u.may_use(),
            uplink_foreground: up.bytes(Class::Foreground),
            uplink_background: up.bytes(Class::Background),
            uplink_cap: up.max_rate(),
        }
    }

    /// The kept samples and one taken now, so that the plots reach the present.
    fn samples_until_now(&self) -> Vec<Sample> {
        let mut s = self.samples.snapshot();
        s.push(self.sample());
        s
    }
}
