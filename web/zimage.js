// Shows what the Z-Image nodes report after they run: the loader's placement plan and the
// sampler's attention backend and speed, as a read-only text line on the node itself.
// Plain ES module, loaded by ComfyUI's frontend from WEB_DIRECTORY; no build step.
import { app } from "../../scripts/app.js";

// node class -> the key of the node's "ui" output that carries its one-line report
const REPORT_KEYS = {
    ZImageShardedLoader: "zimage_plan",
    ZImageSampler: "zimage_run",
};
const WIDGET_NAME = "zimage_info";

function showReport(node, text) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (!widget) {
        // serialize: false keeps the report out of saved workflows and out of widgets_values,
        // so adding it never shifts the values of the node's real inputs.
        widget = node.addWidget("text", WIDGET_NAME, text, () => {}, { serialize: false });
        // The option only keeps it out of the API prompt; the saved workflow's widgets_values
        // follow the widget's own flag.
        widget.serialize = false;
    }
    widget.value = text;
    if (widget.inputEl) {
        widget.inputEl.readOnly = true;
        widget.inputEl.value = text;
    }
    if (typeof node.computeSize === "function" && typeof node.setSize === "function") {
        const [w, h] = node.computeSize();
        // Only grow: a node the user made wider stays as wide.
        node.setSize([Math.max(w, node.size?.[0] ?? 0), h]);
    }
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "zimage.nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        const key = REPORT_KEYS[nodeData?.name];
        if (!key) {
            return;
        }
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            try {
                const report = message?.[key]?.[0];
                if (report !== undefined && report !== null) {
                    showReport(this, String(report));
                }
            } catch (err) {
                console.warn(`zimage.nodes: could not show the ${key} report on the node`, err);
            }
            return onExecuted?.apply(this, arguments);
        };
    },
});
