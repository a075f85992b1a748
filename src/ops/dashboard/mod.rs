//! The dashboard (SPEC 7): the page at `/`, rendered from `src/ops/dashboard/templates/dashboard/` (askama, which escapes
//! every value), the `/dashboard/state.json` it refreshes itself from, and its plots as SVG under
//! `/dashboard/plot/`. Everything it needs is in the binary: the page works on a site with no internet.
//! Reads only what `store`, `fetch`, `server` and `relay` expose, through [`Ops`].

pub mod plot;
pub mod samples;
pub mod view;

use std::sync::atomic::Ordering;

use askama::Template;
use http::{Response, StatusCode};

use super::{text, Ops};
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
}

/// Answers the dashboard's paths; None for any other.
pub fn handle(ops: &Ops, path: &str) -> Option<Response<Body>> {
    Some(match path {
        "/" => page(ops),
        "/dashboard/state.json" => match serde_json::to_string(&View::of(ops)) {
            Ok(json) => text(StatusCode::OK, "application/json", json),
            Err(e) => failed(&e),
        },
        "/dashboard/plot/store.svg" => svg(plot::store(&ops.samples_until_now(), now_ms())),
        "/dashboard/plot/traffic.svg" => svg(plot::traffic(&ops.samples_until_now(), now_ms())),
        _ => return None,
    })
}

fn page(ops: &Ops) -> Response<Body> {
    let samples = ops.samples_until_now();
    let plots = plot::store(&samples, now_ms())
        .and_then(|s| plot::traffic(&samples, now_ms()).map(|t| (s, t)));
    let (store_svg, traffic_svg) = match plots {
        Ok(p) => p,
        Err(e) => return failed(&e),
    };
    let page = Page {
        v: &View::of(ops),
        store_svg: &store_svg,
        traffic_svg: &traffic_svg,
    };
    match page.render() {
        Ok(html) => text(StatusCode::OK, "text/html; charset=utf-8", html),
        Err(e) => failed(&e),
    }
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
        Sample {
            at_ms: now_ms(),
            served: self.server.hit_bytes.load(Ordering::Relaxed)
                + self.server.miss_bytes.load(Ordering::Relaxed),
            fetched: self.fetcher.stats().bytes_fetched.load(Ordering::Relaxed),
            store_used: u.bytes,
            store_budget: u.may_use(),
        }
    }

    /// The kept samples and one taken now, so that the plots reach the present.
    fn samples_until_now(&self) -> Vec<Sample> {
        let mut s = self.samples.snapshot();
        s.push(self.sample());
        s
    }
}
