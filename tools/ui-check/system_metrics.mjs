// The run page's "System metrics" tab: MLflow names each chart after the metric without its
// `system/` prefix. Run by tools/ui_check.py after check.mjs, printed alike.
import { chromium } from "playwright-core";
import path from "node:path";
const failures = [];
function check(ok, what, detail = "") {
  console.log(`ui-check: ${ok ? "ok  " : "FAIL"} ${what}${ok || !detail ? "" : ` (${detail})`}`);
  if (!ok) failures.push(what);
}
const browser = await chromium.launch({
  executablePath: process.env.UI_CHECK_CHROMIUM,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const page = await context.newPage();
  await page.goto(process.env.UI_CHECK_RUN_URL);
  await page.getByText("About this run").waitFor({ timeout: 30000 }).catch(() => {});
  await page.getByRole("tab", { name: "System metrics" }).click();
  await page.locator(".js-plotly-plot").first().waitFor({ timeout: 30000 }).catch(() => {});
  await page.waitForTimeout(2000);
  const text = await page.evaluate(() => document.body.innerText);
  check(/\/system-metrics/.test(page.url()), "the run's System metrics tab opens", page.url());
  const section = text.match(/System metrics\s*\((\d+)\)/);
  check(
    section && Number(section[1]) >= 8,
    "it holds MLflow's CPU, memory, disk and network charts",
    section ? section[0] : "no System metrics section",
  );
  const charts = await page.evaluate(() =>
    [...document.querySelectorAll(".js-plotly-plot")].map((plot) => {
      const card = plot.closest("[data-testid]") || plot.parentElement.parentElement.parentElement;
      const lines = [...plot.querySelectorAll(".scatterlayer .js-line")].map(
        (line) => (line.getAttribute("d") || "").split(/[ML]/).filter(Boolean).length,
      );
      return { title: (card.innerText || "").split("\n")[0], lines };
    }),
  );
  for (const metric of ["cpu_utilization_percentage", "system_memory_usage_megabytes"]) {
    const titled = charts.filter((c) => c.title === metric);
    check(
      titled.some((c) => c.lines.some((points) => points >= 2)),
      `System metrics draws ${metric} over time (2 or more samples)`,
      titled.length ? `lines of ${JSON.stringify(titled.map((c) => c.lines))} points`
        : `no chart; charts: ${charts.map((c) => c.title)}`,
    );
  }
  const file = path.join(process.env.UI_CHECK_OUT, "run-system-metrics.png");
  await page.screenshot({ path: file, fullPage: true });
  console.log(`ui-check: screenshot ${file}`);
} finally {
  await browser.close();
}
process.exit(failures.length ? 1 : 0);
