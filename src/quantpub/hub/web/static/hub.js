// The branch selector: choosing a branch or tag opens its files (and card).
document.querySelectorAll("select[data-nav]").forEach(function (select) {
  select.addEventListener("change", function () {
    if (select.value) { window.location.href = select.value; }
  });
});
