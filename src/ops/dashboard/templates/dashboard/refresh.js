// Refreshes the dashboard in place: every few seconds it reads /dashboard/state.json and the plots,
// and puts the new figures where the page marks them (data-field, data-list, data-plot). Values go in
// as text, never as markup, so nothing a device reported can become part of the page.
(function () {
  "use strict";
  var PERIOD_MS = 2000;
  var TIMEOUT_MS = 5000;

  function at(obj, path) {
    return path.split(".").reduce(function (o, k) {
      return o == null ? undefined : o[k];
    }, obj);
  }

  function isBar(v) {
    return v !== null && typeof v === "object" && "text" in v && "value" in v;
  }

  // One value into one element: a progress bar with its text, or plain text.
  function put(el, v) {
    if (isBar(v)) {
      var p = document.createElement("progress");
      if (v.max != null) {
        p.max = v.max;
        p.value = v.value;
      }
      el.replaceChildren(p, " " + v.text);
    } else {
      el.textContent = v == null ? "" : String(v);
    }
  }

  // The table's columns; the dynamic ones (data-dyn names a list in the state) are laid anew.
  function columns(table, state) {
    var head = table.tHead.rows[0];
    if (table.dataset.dyn) {
      head.querySelectorAll("th.dyn").forEach(function (th) {
        th.remove();
      });
      (at(state, table.dataset.dyn) || []).forEach(function (name) {
        var th = document.createElement("th");
        th.className = "dyn";
        th.dataset.col = table.dataset.dynCol;
        th.dataset.key = name;
        th.textContent = name;
        head.appendChild(th);
      });
    }
    return Array.prototype.map.call(head.cells, function (th) {
      return { col: th.dataset.col, key: th.dataset.key };
    });
  }

  function fillTable(table, state) {
    var cols = columns(table, state);
    var rows = at(state, table.dataset.list) || [];
    var body = document.createElement("tbody");
    rows.forEach(function (r) {
      var tr = body.insertRow();
      cols.forEach(function (c) {
        var v = r[c.col];
        if (c.key !== undefined && v != null) v = v[c.key];
        put(tr.insertCell(), v);
      });
    });
    if (rows.length === 0) {
      var td = body.insertRow().insertCell();
      td.colSpan = cols.length;
      td.className = "empty";
      td.textContent = table.dataset.empty || "none";
    }
    table.replaceChild(body, table.tBodies[0]);
  }

  function apply(state) {
    document.querySelectorAll("[data-field]").forEach(function (el) {
      put(el, at(state, el.dataset.field));
    });
    document.querySelectorAll("table[data-list]").forEach(function (t) {
      fillTable(t, state);
    });
  }

  function get(url, as) {
    var ctl = new AbortController();
    var timer = setTimeout(function () {
      ctl.abort();
    }, TIMEOUT_MS);
    return fetch(url, { cache: "no-store", signal: ctl.signal })
      .then(function (r) {
        if (!r.ok) throw new Error(url + " answered " + r.status);
        return as === "json" ? r.json() : r.text();
      })
      .finally(function () {
        clearTimeout(timer);
      });
  }

  function refreshPlot(fig) {
    return get(fig.dataset.plot, "text").then(function (text) {
      var svg = new DOMParser().parseFromString(text, "image/svg+xml").documentElement;
      if (svg.nodeName !== "svg") throw new Error(fig.dataset.plot + " is not an SVG");
      fig.replaceChildren(document.importNode(svg, true));
    });
  }

  function status(ok, text) {
    var el = document.getElementById("refresh-state");
    el.className = ok ? "ok" : "stale";
    el.textContent = text;
  }

  function tick() {
    var plots = Array.prototype.map.call(document.querySelectorAll("[data-plot]"), refreshPlot);
    Promise.all([get("/dashboard/state.json", "json").then(apply)].concat(plots))
      .then(
        function () {
          status(true, "live");
        },
        function (e) {
          status(false, "not updated: " + e.message);
        }
      )
      .then(function () {
        setTimeout(tick, PERIOD_MS);
      });
  }

  setTimeout(tick, PERIOD_MS);
})();
