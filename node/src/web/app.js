// Swaps in the live part of the page as the daemon pushes it (server-sent events), unless the
// user is in the middle of a form inside it.
(function () {
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  const events = new EventSource("/events");
  events.addEventListener("live", function (event) {
    const active = document.activeElement;
    if (active && live.contains(active) && active.tagName !== "BUTTON") {
      return;
    }
    live.innerHTML = event.data;
    state.textContent = "live";
    state.className = "";
  });
  events.onerror = function () {
    state.textContent = "not connected to the daemon";
    state.className = "problem";
  };
})();
