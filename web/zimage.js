// Shows what the Z-Image nodes report after they run, in full, on the node itself: the loader's
// placement plan (several lines on a GPU, see loaders/placement.py MemoryPlan.summary()) under the
// label "plan", and the sampler's attention backend and speed under "run".
// Plain ES module, loaded by ComfyUI's frontend from WEB_DIRECTORY; no build step.
import { app } from "../../scripts/app.js";

// node class -> the key of the node's "ui" output that carries its report, and the widget's name
const REPORTS = {
    ZImageShardedLoader: { key: "zimage_plan", name: "plan" },
    ZImageSampler: { key: "zimage_run", name: "run" },
};

// The report box: a read-only textarea under a small label, sized to show every line.
const FONT_PX = 11;
const LINE_PX = 15;
const PAD_X = 6;
const PAD_Y = 4;
const LABEL_PX = 15;
const FONT = `${FONT_PX}px monospace`;
const DEFAULT_MARGIN = 10; // ComfyUI's DOM widgets keep this much space around their element

let measureCtx = null;

function textWidth(text) {
    measureCtx ??= document.createElement("canvas").getContext("2d");
    measureCtx.font = FONT;
    return measureCtx.measureText(text).width;
}

// How many rows the text takes in a box `width` pixels wide, wrapped the way a textarea wraps:
// at spaces, and inside a word only when the word alone is wider than the box.
function wrappedLines(text, width) {
    let rows = 0;
    for (const line of String(text).split("\n")) {
        rows += 1;
        let current = "";
        for (const word of line.split(" ")) {
            const candidate = current ? `${current} ${word}` : word;
            if (textWidth(candidate) <= width) {
                current = candidate;
                continue;
            }
            if (current) {
                rows += 1;
            }
            current = word;
            while (current.length > 1 && textWidth(current) > width) {
                let fit = current.length - 1;
                while (fit > 1 && textWidth(current.slice(0, fit)) > width) {
                    fit -= 1;
                }
                current = current.slice(fit);
                rows += 1;
            }
        }
    }
    return rows;
}

function makeReportElement(label) {
    const box = document.createElement("div");
    box.className = "zimage-report";
    Object.assign(box.style, { display: "flex", flexDirection: "column", boxSizing: "border-box" });
    const caption = document.createElement("div");
    caption.textContent = label;
    Object.assign(caption.style, {
        height: `${LABEL_PX}px`, lineHeight: `${LABEL_PX}px`, fontSize: "10px", flex: "none",
        color: "var(--descrip-text, #999)", overflow: "hidden", whiteSpace: "nowrap", userSelect: "none",
    });
    const text = document.createElement("textarea");
    text.className = "comfy-multiline-input";
    text.readOnly = true;
    text.spellcheck = false;
    text.setAttribute("aria-label", label);
    Object.assign(text.style, {
        font: FONT, lineHeight: `${LINE_PX}px`, padding: `${PAD_Y}px ${PAD_X}px`, margin: "0",
        flex: "1 1 auto", width: "100%", minHeight: "0", boxSizing: "border-box", resize: "none",
        whiteSpace: "pre-wrap", overflowWrap: "break-word", border: "none", borderRadius: "4px",
    });
    // The wheel zooms the canvas, as over any other part of the node, unless the text can scroll.
    text.addEventListener("wheel", (event) => {
        if (text.scrollHeight <= text.clientHeight && typeof app.canvas?.processMouseWheel === "function") {
            event.preventDefault();
            app.canvas.processMouseWheel(event);
        }
    }, { passive: false });
    box.append(caption, text);
    return { box, text };
}

function addReportWidget(node, name) {
    if (typeof node.addDOMWidget !== "function") {
        // A frontend without DOM widgets: a one-line text widget is the best it can show.
        const widget = node.addWidget("text", name, "", () => {}, { serialize: false });
        widget.serialize = false;
        return widget;
    }
    const { box, text } = makeReportElement(name);
    let widget = null;
    widget = node.addDOMWidget(name, "zimage_report", box, {
        // serialize: false keeps the report out of the API prompt ...
        serialize: false,
        getValue: () => text.value,
        setValue: (value) => {
            text.value = value ?? "";
        },
        // Tall enough for every line of the report at the node's current width.
        getMinHeight: () => {
            const margin = widget?.margin ?? DEFAULT_MARGIN;
            const inner = (widget?.width ?? node.size?.[0] ?? 300) - 2 * margin - 2 * PAD_X - 4;
            return LABEL_PX + wrappedLines(text.value, Math.max(inner, 40)) * LINE_PX + 2 * PAD_Y + 2 * margin + 2;
        },
    });
    // ... and this keeps it out of the saved workflow's widgets_values, so adding it never shifts
    // the values of the node's real inputs.
    widget.serialize = false;
    widget.label = name;
    widget.inputEl = text;
    return widget;
}

function showReport(node, name, text) {
    const widget = node.widgets?.find((w) => w.name === name) ?? addReportWidget(node, name);
    widget.value = text;
    if (widget.inputEl) {
        widget.inputEl.readOnly = true;
        widget.inputEl.value = text;
    }
    if (typeof node.computeSize === "function" && typeof node.setSize === "function") {
        const [w, h] = node.computeSize();
        // Only grow: a node the user made larger stays as large.
        node.setSize([Math.max(w, node.size?.[0] ?? 0), Math.max(h, node.size?.[1] ?? 0)]);
    }
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "zimage.nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        const report = REPORTS[nodeData?.name];
        if (!report) {
            return;
        }
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            try {
                const text = message?.[report.key]?.[0];
                if (text !== undefined && text !== null) {
                    showReport(this, report.name, String(text));
                }
            } catch (err) {
                console.warn(`zimage.nodes: could not show the ${report.key} report on the node`, err);
            }
            return onExecuted?.apply(this, arguments);
        };
    },
});
