// `make ui-check` (run by tools/ui_check.py): opens the links the pipeline prints in headless
// Chromium, each in a fresh browser profile as a new user would, and checks what the MLflow UI shows.
// Prints one line per check; exit 1 if any failed. Screenshots go to --out.
import { chromium } from "playwright-core";
import { parseArgs } from "node:util";
import path from "node:path";

const { values: opt } = parseArgs({
  options: {
    chromium: { type: "string" },
    base: { type: "string" },
    "experiment-link": { type: "string" }, // as `make ui` printed it, from `#/`
    "run-link": { type: "string" }, // as evaluate printed it for the first run, from `#/`
    runs: { type: "string" }, // id=name,id=name
    epochs: { type: "string" },
    out: { type: "string" },
  },
});
const runs = opt.runs.split(",").map((pair) => pair.split("="));
const epochs = Number(opt.epochs);
// The links the project prints (`make ui`, evaluate), on this UI's address.
const experimentUrl = `${opt.base}/${opt["experiment-link"]}`;
const runUrl = `${opt.base}/${opt["run-link"]}`;
const experimentId = opt["experiment-link"].match(/experiments\/(\d+)/)[1];

const failures = [];
function check(ok, what, detail = "") {
  console.log(`ui-check: ${ok ? "ok  " : "FAIL"} ${what}${ok || !detail ? "" : ` (${detail})`}`);
  if (!ok) failures.push(what);
}

const browser = await chromium.launch({
  executablePath: opt.chromium,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

async function freshPage() {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  return context.newPage();
}

async function shot(page, name) {
  const file = path.join(opt.out, name);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

try {
  // 1. The experiment link: the runs table of the training view, with each run's datasets.
  let page = await freshPage();
  await page.goto(experimentUrl);
  for (const [, name] of runs) {
    await page.getByText(name, { exact: true }).first().waitFor({ timeout: 30000 }).catch(() => {});
  }
  const table = await page.evaluate(() => document.body.innerText);
  check(/#\/experiments\/\d+\/runs/.test(page.url()), "experiment link opens the runs table", page.url());
  check(table.includes("Dataset"), "runs table has a Dataset column");
  for (const [, name] of runs) {
    check(table.includes(name), `runs table lists run ${name}`);
  }
  // Each run's row names the dataset it trained on (the newest context shown first).
  const datasetCells = (table.match(/mnist-(train|validation|holdout)/g) || []).length;
  check(datasetCells >= runs.length, "every run shows its dataset", `${datasetCells} dataset cells`);
  check(table.includes("train (dvc stage)"), "the runs' source is the train stage");
  console.log(`ui-check: screenshot ${await shot(page, "experiment.png")}`);

  // 2. A run link: its datasets with their DVC digest and context, then the per-epoch charts.
  const [, runName] = runs[0];
  page = await freshPage();
  await page.goto(runUrl);
  await page.getByText("About this run").waitFor({ timeout: 30000 }).catch(() => {});
  const overview = await page.evaluate(() => document.body.innerText);
  check(overview.includes(runName), "run link opens the run");
  check(/mnist-train \([0-9a-f]{32}\)/.test(overview), "run lists its training dataset with the DVC md5");
  check(/Training/.test(overview), "the dataset's context is shown");
  check(overview.includes("train (dvc stage)"), "the run's source is the train stage");
  console.log(`ui-check: screenshot ${await shot(page, "run.png")}`);

  await page.getByRole("tab", { name: "Model metrics" }).click();
  // Per-epoch series (Keras' logs) are drawn as lines of `epochs` points in Plotly charts.
  const perEpoch = ["loss", "accuracy", "val_loss", "val_accuracy"];
  await page.locator(".js-plotly-plot").first().waitFor({ timeout: 30000 }).catch(() => {});
  // MLflow draws a chart only while it is scrolled into view; the per-epoch series are in the
  // "Model metrics" section, below the final `eval/` values (some of the same name). Each chart is
  // read while in view.
  const visibleCharts = () =>
    page.evaluate(() =>
      [...document.querySelectorAll(".js-plotly-plot")].map((plot) => {
        const card = plot.closest("[data-testid]") || plot.parentElement.parentElement.parentElement;
        const lines = [...plot.querySelectorAll(".scatterlayer .js-line")].map(
          (line) => (line.getAttribute("d") || "").split(/[ML]/).filter(Boolean).length,
        );
        return { title: (card.innerText || "").split("\n")[0], lines };
      }),
    );
  // Scroll the charts' container top to bottom, reading the charts in view at each stop.
  const stops = await page.evaluate(() => {
    const scroller = [...document.querySelectorAll("*")].find(
      (e) =>
        e.scrollHeight > e.clientHeight + 50 &&
        /auto|scroll/.test(getComputedStyle(e).overflowY) &&
        e.querySelector(".js-plotly-plot"),
    );
    window.__chartScroller = scroller;
    return scroller ? Math.ceil(scroller.scrollHeight / 300) + 1 : 1;
  });
  const charts = [];
  for (let stop = 0; stop < stops; stop++) {
    await page.evaluate((y) => window.__chartScroller?.scrollTo(0, y), stop * 300);
    await page.waitForTimeout(1000);
    charts.push(...(await visibleCharts()));
  }
  for (const metric of perEpoch) {
    // `eval/val_loss` has a bar chart of the same title in the eval section: any line chart will do.
    const titled = charts.filter((c) => c.title === metric);
    check(
      titled.some((c) => c.lines.includes(epochs)),
      `run page draws ${metric} per epoch (${epochs} points)`,
      titled.length
        ? `lines of ${JSON.stringify(titled.map((c) => c.lines))} points`
        : `no chart; charts: ${charts.map((c) => c.title)}`,
    );
  }
  await page.getByText("Model metrics", { exact: true }).last().evaluate((e) => e.scrollIntoView());
  console.log(`ui-check: screenshot ${await shot(page, "run-charts.png")}`);

  // 3. Why the links carry the parameter (a watchdog on MLflow's UI): a plain experiment link in a
  // fresh browser still opens the GenAI overview. When this fails, MLflow honours the experiment
  // kind tag on its own and the parameter can go.
  page = await freshPage();
  await page.goto(`${opt.base}/#/experiments/${experimentId}`);
  await page.waitForURL(/workflowType=/, { timeout: 30000 }).catch(() => {});
  check(
    page.url().includes("workflowType=genai"),
    "a plain experiment link still opens MLflow's GenAI view (links need the parameter)",
    page.url(),
  );
  console.log(`ui-check: screenshot ${await shot(page, "plain-link.png")}`);
} finally {
  await browser.close();
}
if (failures.length) {
  console.log(`ui-check: ${failures.length} check(s) failed; screenshots in ${opt.out}`);
  process.exit(1);
}
console.log(`ui-check: all checks passed; screenshots in ${opt.out}`);
